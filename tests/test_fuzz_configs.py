"""Bad configs, fuzzed (issue 17, item 5): seeded random mutations of every shipped config (wrong types, unknown
keys, out-of-range values, YAML syntax errors) and empty files, each given to ``latentdiff train``. Each must
give one line on stderr naming the problem, exit status 2, and write nothing (no run folder, no cache).

The mutations are drawn from a seeded generator with bounded counts per config and kind (PER_KIND); the
training loop itself is replaced by a trap, so a mutation that were accepted fails fast instead of training."""

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import latentdiff.train.run as run_module
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from latentdiff.recipes import RECIPES

from helpers.clitools import run_cli

CONFIGS = sorted(RECIPES.glob("*.yaml"))
PER_KIND = {"wrong type": 3, "unknown key": 2, "out of range": 2, "yaml syntax": 2}
EMPTY = ["", "\n\n", "# only a comment\n"]

# Values out of range for keys the shipped configs use: each must be refused wherever it appears.
OUT_OF_RANGE = {
    ("train", "steps"): [0, -5], ("train", "batch_size"): [0, -8], ("train", "lr"): [0.0, -1.0e-3],
    ("train", "ema_decay"): [1.5, -0.1], ("train", "checkpoint_every"): [-1], ("train", "log_every"): [0, -2],
    ("train", "warmup_steps"): [-1], ("train", "grad_clip"): [-1.0], ("train", "max_minutes"): [-1],
    ("train", "cond_drop_prob"): [1.5, -0.5], ("train", "keep_checkpoints"): [-1], ("train", "sample_num"): [0],
    ("diffusion", "num_steps"): [0, -10], ("data", "size"): [0, -32], ("sample", "steps"): [0, -1],
    ("sample", "num"): [0], ("sample", "batch_size"): [0], ("model", "num_res_blocks"): [-1],
    ("model", "model_channels"): [0, -32], ("model", "channel_mult"): [[], [0, 2]], ("model", "dropout"): [1.5, -0.1],
    ("autoencoder", "ch"): [0, -8], ("autoencoder", "ch_mult"): [[], [0, 2]], ("autoencoder", "z_channels"): [0],
    ("autoencoder", "embed_dim"): [0], ("autoencoder", "num_res_blocks"): [0, -1],
    ("loss", "kl_weight"): [-1.0], ("loss", "disc_weight"): [-0.5], ("loss", "disc_start"): [-3],
    ("discriminator", "ndf"): [0], ("discriminator", "n_layers"): [0],
    ("conditioning", "context_length"): [0], ("conditioning", "num_classes"): [0, -3], ("eval_num", ): [-1],
}
BAD_YAML = ["key: [unclosed", "  - item: : x", "bad: 'unterminated", "\tindented: tab", "{a: 1", "x: *nope",
            "- a\nb: c", "]"]


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(d: dict, path, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def _wrong_type(value, rng):
    if isinstance(value, bool):
        options = ["maybe", {"x": 1}, [1]]
    elif isinstance(value, (int, float)):
        options = ["abc", [1, 2], {"x": 1}, True]
    elif isinstance(value, str):
        options = [[1], {"x": 1}]
    elif isinstance(value, list):
        options = ["abc", {"x": 1}, 3]
    else:  # None: an optional value
        options = [{"x": 1}, [{"y": 2}]]
    return rng.choice(options)


def _mutations(path: Path, seed: int):
    """(kind, text, key the error must name) for the config file ``path``."""
    text = path.read_text()
    base = yaml.safe_load(text)
    rng = random.Random(f"{seed}:{path.name}")
    leaves = list(_leaves(base))
    for _ in range(PER_KIND["wrong type"]):
        key, value = rng.choice(leaves)
        d = copy.deepcopy(base)
        _set(d, key, _wrong_type(value, rng))
        yield "wrong type", yaml.safe_dump(d), key[-1]
    for i in range(PER_KIND["unknown key"]):
        d = copy.deepcopy(base)
        name = f"zq{rng.randrange(1000)}"
        if i == 0:
            d[name] = {"x": 1}  # a new section
        else:
            section = rng.choice([k for k, v in d.items() if isinstance(v, dict)])
            d[section][name] = 1
        yield "unknown key", yaml.safe_dump(d), name
    present = [k for k in OUT_OF_RANGE if _has(base, k)]
    for _ in range(PER_KIND["out of range"]):
        key = rng.choice(present)
        d = copy.deepcopy(base)
        _set(d, key, rng.choice(OUT_OF_RANGE[key]))
        yield "out of range", yaml.safe_dump(d), key[-1]
    lines = text.splitlines()
    for _ in range(PER_KIND["yaml syntax"]):
        while True:
            at, bad = rng.randrange(len(lines) + 1), rng.choice(BAD_YAML)
            broken = "\n".join([*lines[:at], bad, *lines[at:]]) + "\n"
            try:
                yaml.safe_load(broken)
            except yaml.YAMLError:
                break
        yield "yaml syntax", broken, "invalid YAML"


def _has(d: dict, key) -> bool:
    for k in key:
        if not isinstance(d, dict) or k not in d:
            return False
        d = d[k]
    return True


def _cases():
    for path in CONFIGS:
        for kind, text, named in _mutations(path, seed=17):
            yield path.stem, kind, text, named
    for i, text in enumerate(EMPTY):
        yield f"empty{i}", "empty", text, "empty"


CASES = list(_cases())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """What the shipped configs name, so that a mutation deep in a section is reached: an image folder with
    captions (data/images) and tiny autoencoders where the latent recipes expect their first stage."""
    root = tmp_path_factory.mktemp("world")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a red circle number {i}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for name, size, embed in (("shapes_vae_kl_f4", 32, 3), ("shapes_vae_txt2img", 32, 3),
                              ("shapes_vae_kl_f4_conv", 32, 3), ("shapes_vae_layout", 32, 4),
                              ("folder_vae_kl_f4", 64, 4)):
        torch.manual_seed(0)
        ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=size,
                                           z_channels=embed, embed_dim=embed))
        save_autoencoder(ae, str(root / "runs" / name), latent_scale=1.0)
    _text_model(root)
    return root


def _text_model(root: Path) -> None:
    """An untrained model of the text-to-image recipe at runs/shapes_ldm_txt2img, which shapes_inpaint starts from
    (train.init_from): its architecture and tokenizer, built from the recipe itself."""
    from latentdiff.config import load_config
    from latentdiff.data.captions import dataset_captions
    from latentdiff.nn.tokenizer import WordTokenizer
    from latentdiff.pipeline import Pipeline
    from latentdiff.train.run import resolve_data

    dataset, config = resolve_data(load_config(RECIPES / "shapes_ldm_txt2img.yaml"))
    tokenizer = WordTokenizer.build(dataset_captions(dataset, 500, key="caption"))
    torch.manual_seed(0)
    Pipeline.from_config(config, base_dir=root, tokenizer=tokenizer).save(root / "runs" / "shapes_ldm_txt2img")


@pytest.fixture
def trap(world, monkeypatch, tmp_path):
    def accepted(*args, **kwargs):
        raise AssertionError("the training loop was reached: the mutated config was accepted")

    monkeypatch.setattr(run_module, "train", accepted)
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(world)


def test_the_fuzz_covers_every_shipped_config_and_kind():
    assert len(CONFIGS) >= 15
    counts = {}
    for _, kind, _, _ in CASES:
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == {**{k: n * len(CONFIGS) for k, n in PER_KIND.items()}, "empty": len(EMPTY)}
    print(f"\nconfig fuzz cases: {counts}, {len(CASES)} in all")


@pytest.mark.parametrize("name,kind,text,named", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_a_mutated_config_is_one_line_exit_2_and_nothing_written(name, kind, text, named, trap, world, tmp_path,
                                                                  capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    before = {p for p in tmp_path.rglob("*")} | {p for p in world.rglob("*")}
    rc, out, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("latentdiff train: error: "), (kind, out + err)
    assert named in lines[0], (kind, named, lines[0])
    assert {p for p in tmp_path.rglob("*")} | {p for p in world.rglob("*")} == before, "a refused config wrote files"
