"""Corrupt files (issue 17, item 4): every file of a checkpoint, of a (latent) model folder and of an autoencoder
folder is truncated, has a bit flipped (at several seeded offsets) or is deleted. Resuming falls back to the
newest intact checkpoint with a warning naming the bad file, and ends on the bytes of an undamaged run; loading
a damaged folder gives a one-line error naming the file, or a warning naming it (a config that still parses is
then validated as any config), or, when the damage changed nothing that is read, the very same model. Never a
traceback, never a silently different model."""

import hashlib
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import latentdiff
from latentdiff.config import load_config
from latentdiff.data import make_dataset
from latentdiff.errors import UserError
from latentdiff.first_stage import first_images
from latentdiff.nn.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    compute_latent_scale,
    load_autoencoder,
    save_autoencoder,
)
from latentdiff.pipeline import Pipeline
from latentdiff.train import (
    CheckpointError,
    TrainConfig,
    find_resume_checkpoint,
    latest_checkpoint,
    train,
    verify_checkpoint,
)
from latentdiff.train.run import resolve_data

from helpers.clitools import run_cli
from helpers.train_tiny import ToyImages, make_objective

CONFIG = dict(steps=4, batch_size=8, lr=3e-3, checkpoint_every=2, keep_checkpoints=0, log_every=1, ema_decay=0.9,
              deterministic=True, seed=4)
CKPT_FILES = ("state.json", "models/unet.safetensors", "ema/unet.safetensors", "optimizers.pt", "objective.pt",
              "rng/rank0.pt")
FLIPS = 3  # bit flips per file, at seeded random offsets
LDM = """
model: {preset: tiny, num_classes: 4}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: shapes, size: 16}
latent: {first_stage: FIRST_STAGE, sample_posterior: false, cache: false}
sample: {sampler: ddim, steps: 2, num: 1, batch_size: 1}
"""


def _damages(path: Path, seed: int) -> list[tuple[str, object]]:
    """(name, apply) for each damage of the file ``path``: truncate to half, FLIPS bit flips, delete."""
    size = path.stat().st_size
    rng = random.Random(f"{seed}:{path.name}")
    out = [("truncate", lambda p: p.write_bytes(p.read_bytes()[: size // 2]))]
    for _ in range(FLIPS):
        at, bit = rng.randrange(size), rng.randrange(8)

        def flip(p, at=at, bit=bit):
            b = bytearray(p.read_bytes())
            b[at] ^= 1 << bit
            p.write_bytes(bytes(b))

        out.append((f"flip@{at}.{bit}", flip))
    out.append(("delete", lambda p: p.unlink()))
    return out


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cases(folder: Path, files, seed: int):
    for rel in files:
        for name, damage in _damages(folder / rel, seed):
            yield rel, name, damage


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(make_objective(T=10, dropout=0.1, sampler="loss_second_moment"), ToyImages(n=24), TrainConfig(**CONFIG), out,
          progress=False)
    return out


def test_every_damaged_checkpoint_file_is_named_and_resume_falls_back(run, tmp_path):
    last = run / "checkpoints" / "step_0000004"
    final = {f: _sha(last / f) for f in CKPT_FILES if f != "state.json"}
    count = 0
    for rel, name, damage in _cases(last, CKPT_FILES, seed=1):
        copy = tmp_path / f"case{count}"
        shutil.copytree(run, copy)
        damage(copy / "checkpoints" / "step_0000004" / rel)
        with pytest.raises(CheckpointError) as err:
            verify_checkpoint(copy / "checkpoints" / "step_0000004")
        assert rel in str(err.value) and "\n" not in str(err.value), (rel, name, str(err.value))
        with pytest.warns(UserWarning, match=rf"skipping checkpoint step_0000004: .*{rel}"):
            assert find_resume_checkpoint(copy)[0].name == "step_0000002"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(make_objective(T=10, dropout=0.1, sampler="loss_second_moment"), ToyImages(n=24),
                           TrainConfig(**CONFIG), copy, resume=True, progress=False)
        assert result.step == 4, (rel, name)
        assert {f: _sha(copy / "checkpoints" / "step_0000004" / f) for f in final} == final, (rel, name)
        shutil.rmtree(copy)
        count += 1
    assert count == len(CKPT_FILES) * (FLIPS + 2)
    print(f"\ncorrupt checkpoint files: {count} cases, each named and resumed from the previous checkpoint")


def test_a_damaged_latest_pointer_is_only_a_hint(run, tmp_path):
    count = 0
    for _, name, damage in _cases(run / "checkpoints", ["latest"], seed=2):
        copy = tmp_path / f"case{count}"
        shutil.copytree(run, copy)
        damage(copy / "checkpoints" / "latest")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert latest_checkpoint(copy).name == "step_0000004", name
        assert all("latest" in str(w.message) for w in seen), name
        count += 1
    assert count == FLIPS + 2


# ----------------------------------------------------------------------------------------------------------
# Model and autoencoder folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16))
    x = first_images(make_dataset("shapes", size=16), 8)
    save_autoencoder(ae, str(root / "ae"), latent_scale=compute_latent_scale(ae, x, torch.Generator().manual_seed(0)))
    (root / "ldm.yaml").write_text(LDM.replace("FIRST_STAGE", str(root / "ae")))
    _, config = resolve_data(load_config(root / "ldm.yaml"))
    Pipeline.from_config(config).save(root / "model")
    return {"ae": root / "ae", "model": root / "model"}


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _outcome(load, folder: Path, rel: str, reference) -> str:
    """"error" (one line naming ``rel``), "warned" (a warning naming it) or "same" (loads to ``reference``)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            loaded = load(folder)
        except UserError as e:
            msg = str(e)
            assert "\n" not in msg and Path(rel).name in msg, (rel, msg)
            return "error"
    named = [w for w in seen if Path(rel).name in str(w.message)]
    if named:
        return "warned"
    assert not seen, (rel, [str(w.message) for w in seen])
    state = loaded
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), \
        f"{rel}: a damaged file loaded silently into a different model"
    return "same"


def _pipeline_state(folder):
    pipe = latentdiff.load(folder)
    ae = {} if pipe.autoencoder is None else {f"ae.{k}": v for k, v in _state(pipe.autoencoder).items()}
    return {**{f"unet.{k}": v for k, v in _state(pipe.unet).items()}, **ae,
            "scale": torch.tensor(float(pipe.latent_scale or 0)), "config": torch.tensor(hash(repr(pipe.config)))}


def _autoencoder_state(folder):
    ae = load_autoencoder(str(folder))
    return {**_state(ae), "scale": torch.tensor(float(ae.latent_scale or 0))}


@pytest.mark.parametrize("kind", ["model", "ae"])
def test_every_damaged_folder_file_is_an_error_a_warning_or_harmless(kind, folders, tmp_path):
    folder = folders[kind]
    load = _pipeline_state if kind == "model" else _autoencoder_state
    reference = load(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    expected = {"model": ["config.yaml", "first_stage/config.json", "first_stage/model.safetensors",
                          "model.safetensors"], "ae": ["config.json", "model.safetensors"]}[kind]
    assert files == expected
    outcomes = {}
    for i, (rel, name, damage) in enumerate(_cases(folder, files, seed=3)):
        copy = tmp_path / f"case{i}"
        shutil.copytree(folder, copy)
        damage(copy / rel)
        outcome = _outcome(load, copy, rel, reference)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if rel.endswith(".safetensors"):
            assert outcome == "error", (rel, name)  # weights are sealed: no damage passes
        shutil.rmtree(copy)
    assert sum(outcomes.values()) == len(files) * (FLIPS + 2)
    print(f"\ncorrupt {kind} folder files: {sum(outcomes.values())} cases, outcomes {outcomes}")


def test_the_command_reports_a_damaged_model_in_one_line(folders, tmp_path, capsys):
    copy = tmp_path / "model"
    shutil.copytree(folders["model"], copy)
    weights = copy / "first_stage" / "model.safetensors"
    b = bytearray(weights.read_bytes())
    b[-3] ^= 0x10  # in the tensor data: still a valid file
    weights.write_bytes(bytes(b))
    rc, out, err = run_cli(capsys, "sample", copy, "--num", 1, "--steps", 1, "--out", tmp_path / "x.png")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"weights file {weights} is truncated or corrupt" in err and not (tmp_path / "x.png").exists()
