"""Text-to-image latent diffusion end to end (issue 12, "Tests"): L_LDM = E‖ε − ε_θ(z_t, t, τ_θ(y))‖² with
z_0 = s·ℰ(x) (Rombach et al. 2022, eq. 2 and sec. 3.3), trained from a config and sampled from the command.

The first stage is a tiny untrained KL-f4 autoencoder with 4 latent channels: 16x16 RGB images become 4x4x4
latents, a shape pixels cannot have, and its latent scale s = 0.5 is far from 1, so a U-Net fed raw pixels or
unscaled latents is caught. Runs are a few steps of the tiny U-Net; caches go to a temporary LATENTDIFF_CACHE.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.config import ConfigError, load_config
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder, save_autoencoder
from latentdiff.nn.tokenizer import UNK_ID
from latentdiff.pngmeta import read_png_params
from latentdiff.samplers import sample as run_sampler
from latentdiff.train import run as train_run
from latentdiff.train.objective import DiffusionObjective
from latentdiff.train.run import resolve_data, train_from_config

from helpers.clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.5  # the first stage's latent scale s; not 1, so that a missing s shows
LATENT = (4, 4, 4)  # ℰ(x) of a 3x16x16 image: 4 channels at 4x4
STEPS = 3
P1, P2 = "a red circle at the top left", "a blue square in the centre"
TEXT = """
model: {preset: tiny}
diffusion: {schedule: scaled_linear, num_steps: 50}
data: {name: shapes, size: 16, options: {length: 64}}
latent: {cache_pool: 16}
conditioning: {kind: text, vocab_pool: 64, text: {width: 16, depth: 1, heads: 2}}
train: {steps: 3, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.2, checkpoint_every: 3,
        sample_every: 0, log_every: 1, mixed_precision: "no"}
sample: {sampler: ddim, steps: 3, guidance: 2.0, num: 2, batch_size: 2, prompts: ["a red circle at the top left"]}
"""


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """No cache (latents, statistics) leaks out of this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def make_first_stage(folder: Path, seed: int = 0) -> Path:
    """A tiny KL-f4 autoencoder with 4 latent channels (untrained: weights from ``seed``) saved with s = 0.5."""
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       z_channels=4, embed_dim=4))
    save_autoencoder(ae, str(folder), latent_scale=SCALE)
    return folder


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    return make_first_stage(tmp_path_factory.mktemp("ae") / "kl_f4")


@pytest.fixture(scope="module")
def text_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "txt2img.yaml"
    path.write_text(TEXT)
    return path


def text_config(yaml: Path, first_stage: Path, *overrides: str):
    return load_config(yaml, [f"latent.first_stage={first_stage}", *overrides])


@pytest.fixture(scope="module")
def text_run(text_yaml, first_stage, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "txt2img"
    assert train_from_config(text_config(text_yaml, first_stage), out, progress=False).step == STEPS
    return out


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    """configs/tiny_test.yaml (class-conditional digits) trained 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "class"
    config = load_config(ROOT / "configs" / "tiny_test.yaml", ["train.steps=2"])
    train_from_config(config, out, progress=False)
    return out


def recording_objective(records: dict):
    """A DiffusionObjective that records, each step, the batch it gets, the x_0 it hands the diffusion loss and
    the x_t the U-Net is called on (a forward pre-hook, so nothing about the U-Net changes)."""

    class Recording(DiffusionObjective):
        def __init__(self, model, diffusion, **kwargs):
            super().__init__(model, diffusion, **kwargs)
            model.register_forward_pre_hook(lambda module, args: records["x_t"].append(args[0].detach().clone()))
            loss = diffusion.training_losses

            def recorded(model_fn, x0, *args, **kw):
                records["x0"].append(x0.detach().clone())
                return loss(model_fn, x0, *args, **kw)

            diffusion.training_losses = recorded

        def losses(self, batch, step):
            records["batch"].append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in batch.items()})
            return super().losses(batch, step)

    return Recording


def count_encoder_calls(monkeypatch) -> dict:
    """Counts every run of the first stage's encoder (encode, posterior and the cache go through encode_moments)."""
    calls = {"n": 0}
    original = Autoencoder.encode_moments

    def counted(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(Autoencoder, "encode_moments", counted)
    return calls


# ---------------------------------------------------------------------------------------------------------
# Latent training is trained on s·ℰ(x)


@pytest.mark.parametrize("cache, posterior", [(True, True), (True, False), (False, False)],
                         ids=["cached-posterior-sample", "cached-posterior-mean", "uncached-posterior-mean"])
def test_the_unet_is_trained_on_scaled_first_stage_latents(cache, posterior, text_yaml, first_stage, tmp_path,
                                                           monkeypatch):
    records = {"batch": [], "x0": [], "x_t": []}
    monkeypatch.setattr(train_run, "DiffusionObjective", recording_objective(records))
    config = text_config(text_yaml, first_stage, f"latent.cache={cache}", f"latent.sample_posterior={posterior}")
    train_from_config(config, tmp_path / "run", progress=False)

    assert latentdiff.load(tmp_path / "run").unet.config.in_channels == LATENT[0]
    assert len(records["x0"]) == STEPS and len(records["x_t"]) == STEPS
    assert all(x.shape == (4, *LATENT) for x in records["x0"] + records["x_t"])  # never 3x16x16 pixels
    ae = load_autoencoder(str(first_stage)).eval()
    dataset, _ = resolve_data(config)
    pool = range(16)  # latent.cache_pool
    with torch.no_grad():
        post = ae.posterior(torch.stack([dataset[i]["image"] for i in pool]))
    eps = []
    for batch, x0 in zip(records["batch"], records["x0"]):
        if not cache:  # the encoder runs on the batch's images: x_0 = s·ℰ(x), the posterior mean here
            with torch.no_grad():
                torch.testing.assert_close(x0, SCALE * ae.encode(batch["image"], sample=False), atol=1e-5, rtol=1e-5)
            continue
        assert "image" not in batch  # cached: training never sees (or encodes) an image
        # Each row is the cached ℰ of one pool item, which keeps that item's caption.
        rows = [[i for i in pool if torch.allclose(m, post.mean[i], atol=1e-5)] for m in batch["latent_mean"]]
        assert all(len(r) == 1 for r in rows), rows
        idx = [r[0] for r in rows]
        assert batch["caption"] == [dataset[i]["caption"] for i in idx]
        if posterior:  # a fresh posterior sample each step: x_0 = s·(μ + σ·ε), ε ~ N(0, I)
            torch.testing.assert_close(batch["latent_std"], post.std[idx], atol=1e-5, rtol=1e-5)
            eps.append((x0 / SCALE - post.mean[idx]) / post.std[idx])
        else:
            torch.testing.assert_close(x0, SCALE * post.mean[idx], atol=1e-5, rtol=1e-5)
    if eps:
        eps = torch.cat(eps)  # 3 steps x 4 x 64 values: their mean and std are within ±0.05 of 0 and 1 or so
        assert abs(float(eps.mean())) < 0.15 and 0.85 < float(eps.std()) < 1.15, (eps.mean(), eps.std())


# ---------------------------------------------------------------------------------------------------------
# The latent cache


def test_the_cache_is_reused_and_rebuilt_when_the_autoencoder_changes(text_yaml, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENTDIFF_CACHE", str(cache))
    ae_dir = make_first_stage(tmp_path / "ae")
    calls = count_encoder_calls(monkeypatch)
    config = text_config(text_yaml, ae_dir)

    def folders():
        return sorted(p.name for p in (cache / "latents").iterdir())

    train_from_config(config, tmp_path / "a", progress=False)
    assert calls["n"] > 0 and len(folders()) == 1
    meta = json.loads((cache / "latents" / folders()[0] / "meta.json").read_text())
    assert meta["count"] == 16 and meta["latent_shape"] == list(LATENT)  # the pool of the endless shapes world

    calls["n"] = 0
    train_from_config(config, tmp_path / "b", progress=False)
    assert calls["n"] == 0, "a valid cache was not used: the encoder ran again"
    assert len(folders()) == 1

    make_first_stage(tmp_path / "ae", seed=1)  # other weights, same folder and config
    before = set(folders())
    train_from_config(config, tmp_path / "c", progress=False)
    assert calls["n"] > 0 and len(folders()) == 2
    new = (set(folders()) - before).pop()
    meta = json.loads((cache / "latents" / new / "meta.json").read_text())
    from latentdiff.data.latent_cache import autoencoder_hash

    assert meta["key"]["autoencoder"] == autoencoder_hash(load_autoencoder(str(ae_dir)))


# ---------------------------------------------------------------------------------------------------------
# Text conditioning and guidance


def test_the_text_encoder_and_the_samples_change_with_the_prompt(text_run):
    pipe = latentdiff.load(text_run)
    context = pipe.conditioner({"prompt": [P1, P2, ""]})["context"]
    L = pipe.conditioner.tokenizer.context_length
    assert context.shape == (3, L, 16)
    assert not torch.equal(context[0], context[1]) and not torch.equal(context[0], context[2])
    a = pipe.sample(1, prompts=[P1], guidance=1.0, seed=0, output="tensor")
    b = pipe.sample(1, prompts=[P2], guidance=1.0, seed=0, output="tensor")
    assert not torch.equal(a, b)
    assert torch.equal(a, pipe.sample(1, prompts=[P1], guidance=1.0, seed=0, output="tensor"))  # deterministic


def _direct(pipe, prompts, *, seed, guidance=1.0, uncond_prompt=None):
    """The images that the sampler gives for ``prompts`` with the conditioner's contexts passed by hand: the
    conditional model alone (no unconditional branch), or guided against ``uncond_prompt``."""
    s = pipe.config.sample
    n = len(prompts)
    uncond = None if uncond_prompt is None else pipe.conditioner({"prompt": [uncond_prompt] * n})
    with torch.no_grad():
        z = run_sampler(pipe.unet, torch.empty(n, *pipe.sample_shape), diffusion=pipe.diffusion, sampler=s.sampler,
                        steps=s.steps, seed=[seed + i for i in range(n)], guidance_scale=guidance, uncond=uncond,
                        **pipe.conditioner({"prompt": list(prompts)}))
    return pipe.decode(z)


def test_guidance_1_is_the_conditional_model_and_the_negative_prompt_is_the_unconditional_branch(text_run):
    pipe = latentdiff.load(text_run)
    batches = []

    def counted(x, t, **cond):
        batches.append(x.shape[0])
        return pipe.model_fn(x, t, **cond)

    g1 = pipe.sample(2, prompts=[P1, P2], guidance=1.0, seed=3, output="tensor", model_fn=counted)
    assert set(batches) == {2}  # one conditional pass, no unconditional one
    assert torch.equal(g1, _direct(pipe, [P1, P2], seed=3))
    assert torch.equal(g1, pipe.sample(2, prompts=[P1, P2], guidance=1.0, negative_prompt="a green triangle", seed=3,
                                       output="tensor"))

    g3 = pipe.sample(2, prompts=[P1, P2], guidance=3.0, seed=3, output="tensor")
    assert not torch.equal(g3, g1)
    assert torch.equal(g3, _direct(pipe, [P1, P2], seed=3, guidance=3.0, uncond_prompt=""))
    assert torch.equal(g3, pipe.sample(2, prompts=[P1, P2], guidance=3.0, negative_prompt="", seed=3, output="tensor"))
    negative = pipe.sample(2, prompts=[P1, P2], guidance=3.0, negative_prompt="a green triangle", seed=3,
                           output="tensor")
    assert not torch.equal(negative, g3)
    assert torch.equal(negative, _direct(pipe, [P1, P2], seed=3, guidance=3.0, uncond_prompt="a green triangle"))


def test_an_unknown_word_is_the_unknown_token_not_an_error(text_run, tmp_path, capsys):
    pipe = latentdiff.load(text_run)
    tokens = pipe.conditioner.tokenizer.encode(["a zebra circle", "a giraffe circle"])
    assert tokens[0, 1] == UNK_ID and torch.equal(tokens[0], tokens[1])
    a = pipe.sample(1, prompts=["a zebra circle"], seed=0, output="tensor")
    assert torch.isfinite(a).all()
    assert torch.equal(a, pipe.sample(1, prompts=["a giraffe circle"], seed=0, output="tensor"))
    rc, _, err = run_cli(capsys, "sample", text_run, "--prompt", "a purple zebra plays the violin", "--num", 1,
                         "--out", tmp_path / "zebra.png", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "zebra.png").is_file()


# ---------------------------------------------------------------------------------------------------------
# The command: grids, folders, PNG metadata


def _tile(grid, r: int, c: int, side: int = 16, pad: int = 2):
    """Image (r, c) of a grid from train.logging.make_grid (padding 2)."""
    y, x = pad + r * (side + pad), pad + c * (side + pad)
    return grid[y : y + side, x : x + side]


def test_sample_command_writes_a_grid_with_one_row_per_prompt_and_its_parameters(text_run, tmp_path, capsys):
    import numpy as np

    out = tmp_path / "grid.png"
    rc, _, err = run_cli(capsys, "sample", text_run, "--prompt", P1, "--prompt", P2, "--num", 4, "--guidance", 3,
                         "--negative-prompt", "a green triangle", "--seed", 7, "--steps", 2, "--out", out, "--quiet")
    assert rc == 0, err
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 2 rows (prompts) x 2 seeds of 16x16 RGB images
    pipe = latentdiff.load(text_run)
    images = pipe.sample(4, prompts=[P1, P2], guidance=3, negative_prompt="a green triangle", seed=7, steps=2)
    for (r, c), i in {(0, 0): 0, (0, 1): 2, (1, 0): 1, (1, 1): 3}.items():  # image i has prompt i mod 2
        assert np.array_equal(_tile(grid, r, c), np.asarray(images[i])), (r, c)

    params = read_png_params(out)
    assert params["prompt"] == [P1, P2] and params["negative_prompt"] == "a green triangle"
    assert (params["seed"], params["steps"], params["guidance"], params["sampler"]) == (7, 2, 3.0, "ddim")
    assert params["model"] == str(text_run.resolve()) and params["num"] == 4
    rc, printed, err = run_cli(capsys, "info", out)
    assert rc == 0, err
    lines = printed.splitlines()
    assert lines[0].startswith("prompt") and P1 in lines[0] and P2 in lines[0]
    assert any(line.startswith("negative prompt") and "a green triangle" in line for line in lines)
    assert any(line.split() == ["seed", "7"] for line in lines)


def test_sample_command_writes_a_folder_of_pngs_each_with_its_own_parameters(text_run, tmp_path, capsys):
    out = tmp_path / "samples"
    rc, _, err = run_cli(capsys, "sample", text_run, "--prompt", P1, "--prompt", P2, "--num", 3, "--seed", 5,
                         "--size", "24x32", "--out", out, "--quiet")
    assert rc == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000_seed5.png", "00001_seed6.png", "00002_seed7.png"]
    for i, name in enumerate(files):
        with Image.open(out / name) as im:
            assert im.size == (32, 24)  # W x H: sampled larger than trained, convolutionally
        params = read_png_params(out / name)
        assert params["prompt"] == [P1, P2][i % 2] and params["seed"] == 5 + i and params["size"] == [24, 32]
        assert params["negative_prompt"] == "" and params["guidance"] == 2.0
        rc, printed, _ = run_cli(capsys, "info", out / name)
        assert rc == 0 and printed.splitlines()[0].split(None, 1) == ["prompt", [P1, P2][i % 2]]


# ---------------------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written


def test_an_empty_prompt_list_is_an_error(text_run):
    pipe = latentdiff.load(text_run)
    with pytest.raises(ConfigError, match="the prompt list is empty"):
        pipe.sample(2, prompts=[])
    with pytest.raises(ConfigError, match="the prompt list is empty"):
        pipe.sample_options(prompts=[])


LONG = " ".join(["red"] * 40)  # 41 tokens with the end token


@pytest.mark.parametrize("out_name", ["never.png", "never_dir"])
@pytest.mark.parametrize("model, args, words", [
    ("text", ["--prompt", LONG], ["41 tokens", "context length {L}"]),
    ("text", ["--size", "20x20"], ["20x20", "not divisible by 8"]),
    ("class", ["--prompt", P1], ["class-conditional", "takes no prompts"]),
    ("text", ["--class", "1"], ["text-conditioned", "takes no class labels"]),
], ids=["prompt-longer-than-context", "size-not-divisible", "prompt-on-class-model", "class-on-text-model"])
def test_bad_sample_requests_are_one_line_errors_that_write_nothing(model, args, words, out_name, text_run,
                                                                    class_run, tmp_path, capsys):
    run = text_run if model == "text" else class_run
    out = tmp_path / out_name
    rc, _, err = run_cli(capsys, "sample", run, *args, "--num", 2, "--out", out, "--quiet")
    assert rc == 2, err
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith("latentdiff sample: error: ") and "\n" not in error
    if model == "text":
        L = latentdiff.load(text_run).conditioner.tokenizer.context_length
        words = [w.format(L=L) for w in words]
    assert all(w in error for w in words), error
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Reproducibility, export


def test_the_same_config_and_seed_train_the_same_bytes(text_yaml, first_stage, tmp_path, monkeypatch):
    runs = []
    for name in ("a", "b"):
        monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / f"cache_{name}"))  # each builds its own latent cache
        train_from_config(text_config(text_yaml, first_stage), tmp_path / name, progress=False)
        runs.append(tmp_path / name)
    step = runs[0] / "checkpoints" / f"step_{STEPS:07d}"
    weights = sorted(p.relative_to(runs[0]) for p in step.rglob("*.safetensors"))
    assert {p.name for p in weights} == {"unet.safetensors", "cond.safetensors"} and len(weights) == 4  # models, ema
    for rel in [*weights, Path("tokenizer.json")]:
        assert (runs[0] / rel).read_bytes() == (runs[1] / rel).read_bytes(), rel


def test_export_then_load_gives_the_run_samples(text_run, tmp_path, capsys):
    model = tmp_path / "model"
    rc, _, err = run_cli(capsys, "export", text_run, model)
    assert rc == 0, err
    for name in ("config.yaml", "model.safetensors", "conditioner.safetensors", "tokenizer.json",
                 "first_stage/model.safetensors"):
        assert (model / name).is_file(), name
    kwargs = {"prompts": [P1, P2], "guidance": 2.0, "negative_prompt": "a green triangle", "seed": 11,
              "output": "tensor"}
    from_run = latentdiff.load(text_run).sample(2, **kwargs)
    assert torch.equal(latentdiff.load(model).sample(2, **kwargs), from_run)
    assert not torch.equal(latentdiff.load(text_run, ema=False).sample(2, **kwargs), from_run)  # EMA was exported
    rc, _, err = run_cli(capsys, "sample", model, "--prompt", P1, "--num", 1, "--out", tmp_path / "m.png", "--quiet")
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------
# A user's own captioned folder


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 30), "yellow": (230, 210, 20)}


def write_captioned_folder(root: Path, captions_as: str, colours=COLOURS) -> list[str]:
    """Eight 16x16 images of a coloured square on white, captioned in metadata.jsonl or sidecar .txt files."""
    root.mkdir(parents=True)
    captions, lines = [], []
    for i in range(8):
        name = list(colours)[i % len(colours)]
        side = "left" if i < 4 else "right"
        im = Image.new("RGB", (16, 16), (255, 255, 255))
        im.paste(colours[name], (1 if side == "left" else 9, 4, 7 if side == "left" else 15, 12))
        im.save(root / f"img{i}.png")
        caption = f"a {name} square on the {side}"
        captions.append(caption)
        if captions_as == "metadata":
            lines.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
        else:
            (root / f"img{i}.txt").write_text(caption + "\n")
    if lines:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return captions


def folder_config(text_yaml, first_stage, root: Path, *overrides: str):
    return text_config(text_yaml, first_stage, "data.name=folder", f"data.root={root}", "data.options={}",
                       "latent.cache_pool=null", *overrides)


@pytest.mark.parametrize("captions_as", ["metadata", "txt"])
def test_a_text_model_trains_on_a_captioned_folder_and_samples_a_prompt(captions_as, text_yaml, first_stage, tmp_path,
                                                                        capsys, monkeypatch):
    captions = write_captioned_folder(tmp_path / "images", captions_as)
    records = {"batch": [], "x0": [], "x_t": []}
    monkeypatch.setattr(train_run, "DiffusionObjective", recording_objective(records))
    run = tmp_path / "run"
    train_from_config(folder_config(text_yaml, first_stage, tmp_path / "images"), run, progress=False)
    assert all(c in captions for b in records["batch"] for c in b["caption"])
    pipe = latentdiff.load(run)
    assert {"yellow", "square", "left", "right"} <= set(pipe.conditioner.tokenizer.vocab)
    assert pipe.sample_shape == LATENT
    out = tmp_path / "yellow.png"
    rc, _, err = run_cli(capsys, "sample", run, "--prompt", "a yellow square on the left", "--num", 2, "--out", out,
                         "--quiet")
    assert rc == 0, err
    assert read_png_params(out)["prompt"] == ["a yellow square on the left"]


def test_a_folder_whose_images_and_captions_change_is_encoded_again(text_yaml, first_stage, tmp_path, monkeypatch):
    """The cache key names the folder's files, not only its path: edited captions or images are not served from
    the cache of the old ones."""
    root = tmp_path / "images"
    write_captioned_folder(root, "metadata")
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    train_from_config(folder_config(text_yaml, first_stage, root), tmp_path / "a", progress=False)
    for p in root.iterdir():
        p.unlink()
    root.rmdir()
    new = write_captioned_folder(root, "metadata", colours={"purple": (150, 30, 160), "orange": (240, 140, 20)})
    records = {"batch": [], "x0": [], "x_t": []}
    monkeypatch.setattr(train_run, "DiffusionObjective", recording_objective(records))
    train_from_config(folder_config(text_yaml, first_stage, root), tmp_path / "b", progress=False)
    seen = [c for b in records["batch"] for c in b["caption"]]
    assert seen and all(c in new for c in seen), seen


RECIPE = ROOT / "configs" / "folder_txt2img.yaml"


@pytest.mark.skipif(not RECIPE.is_file(), reason="configs/folder_txt2img.yaml is not written yet")
def test_the_folder_recipe_trains_on_a_folder(first_stage, tmp_path, capsys):
    write_captioned_folder(tmp_path / "images", "metadata")
    overrides = [f"data.root={tmp_path / 'images'}", "data.size=16", "train.steps=1", "train.batch_size=2",
                 "train.sample_every=0", "train.checkpoint_every=1", "sample.steps=2", "sample.num=1",
                 "sample.batch_size=1"]
    config = load_config(RECIPE, overrides)
    assert config.data.name == "folder" and config.conditioning.kind == "text"
    if config.latent.first_stage is not None:  # the recipe's own first stage is trained by another recipe
        config = load_config(RECIPE, [*overrides, f"latent.first_stage={first_stage}", "latent.scale=null"])
    train_from_config(config, tmp_path / "run", progress=False)
    rc, _, err = run_cli(capsys, "sample", tmp_path / "run", "--prompt", "a red square on the left", "--num", 1,
                         "--out", tmp_path / "x.png", "--quiet")
    assert rc == 0, err
