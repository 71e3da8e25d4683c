"""The `latentdiff` command end to end, in a temporary folder, with configs/tiny_test.yaml: train, resume,
export, sample from the run and from the export, load through the Python API (same seed, same image), and
the clear outcome of each kind of bad input. The commands run in-process through ``cli.main``; one test
runs the installed console script."""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentdiff
from latentdiff import cli
from latentdiff.config import load_config
from latentdiff.pipeline import CONFIG_FILE, WEIGHTS_FILE
from latentdiff.samplers import SAMPLERS
from latentdiff.train import list_checkpoints, verify_checkpoint

from helpers.clitools import captured as _captured
from helpers.clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from threads, and on a busy machine OpenMP's spinning threads cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# One trained run shared by the tests: 2 steps, then resumed to 3.


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "run"
    logs = {}  # module fixtures cannot use capsys: capture by hand
    for name, args in [
        ("first", ["train", TINY, "train.steps=2", "train.checkpoint_every=1", "--out", run_dir, "--quiet"]),
        ("resumed", ["train", TINY, "train.steps=3", "train.checkpoint_every=1", "--out", run_dir, "--resume",
                     "--quiet"]),
    ]:
        logs[name] = _captured(*args)
    return {"root": root, "run": run_dir, "model": root / "model", "logs": logs}


@pytest.fixture(scope="module")
def exported(run):
    rc, out, err = _captured("export", run["run"], run["model"])
    assert rc == 0, err
    assert "exported EMA weights" in out
    return run["model"]


def test_train_then_resume_writes_a_complete_run(run):
    rc, out, err = run["logs"]["first"]
    assert rc == 0, err
    assert "trained to step 2" in out and "data: " in out
    rc, out, err = run["logs"]["resumed"]
    assert rc == 0, err
    assert "resumed from" in out and "step_0000002" in out and "trained to step 3" in out
    run_dir = run["run"]
    assert (run_dir / CONFIG_FILE).is_file()
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert steps == [2, 3]  # keep_checkpoints: 2 of 1, 2, 3
    assert verify_checkpoint(run_dir / "checkpoints" / "step_0000003")["step"] == 3
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    logged = [int(r.split(",")[0]) for r in rows[1:]]
    assert logged == [1, 2, 3]  # the resumed run appended step 3, nothing twice
    # The resolved config names the data's shape, so sampling needs no dataset.
    saved = load_config(run_dir / CONFIG_FILE)
    assert (saved.data.channels, saved.data.size, saved.train.steps) == (1, 8, 3)


def test_train_again_without_resume_is_refused_and_changes_nothing(run, capsys):
    before = (run["run"] / CONFIG_FILE).read_bytes()
    rc, out, err = run_cli(capsys, "train", TINY, "train.steps=3", "diffusion.num_steps=50", "--out", run["run"],
                           "--quiet")
    assert rc == 2 and "already holds checkpoints" in err and "--resume" in err
    assert (run["run"] / CONFIG_FILE).read_bytes() == before
    rc, out, err = run_cli(capsys, "train", TINY, "train.steps=4", "diffusion.num_steps=50", "--out", run["run"],
                           "--resume")
    assert rc == 2 and "another model or diffusion config" in err
    assert (run["run"] / CONFIG_FILE).read_bytes() == before
    assert [s for s, _ in list_checkpoints(run["run"])] == [2, 3]
    # train.resume: latest in the config does what --resume does (here: nothing left to train).
    rc, out, err = run_cli(capsys, "train", TINY, "train.steps=3", "train.resume=latest", "--out", run["run"],
                           "--quiet")
    assert rc == 0 and "resumed from" in out and "step_0000003" in out and "trained to step 3" in out, err
    assert [s for s, _ in list_checkpoints(run["run"])] == [2, 3]


def test_export_writes_the_ema_weights(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    weights = load_file(exported / WEIGHTS_FILE)
    ema = load_file(run["run"] / "checkpoints" / "step_0000003" / "ema" / "unet.safetensors")
    trained = load_file(run["run"] / "checkpoints" / "step_0000003" / "models" / "unet.safetensors")
    assert weights.keys() == ema.keys()
    assert all(torch.equal(weights[k], ema[k]) for k in ema)
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)  # it really is the EMA, not the trained copy


def test_sample_run_and_export_give_the_same_grid(run, exported, capsys):
    a, b = run["root"] / "a.png", run["root"] / "b.png"
    rc, out, err = run_cli(capsys, "sample", run["run"], "--num", 3, "--seed", 5, "--out", a, "--quiet")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "sample", exported, "--num", 3, "--seed", 5, "--out", b, "--quiet")
    assert rc == 0, err
    assert "wrote a grid of 3 images" in out
    assert pixels(a).shape == (2 + 8 + 2, 2 + 3 * (8 + 2)) and pixels(a).dtype == np.uint8  # 1 row of 3 8x8, L mode
    np.testing.assert_array_equal(pixels(a), pixels(b))
    assert pixels(a).std() > 0


def test_same_seed_same_image_from_the_command_and_the_api(exported, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "sample", exported, "--num", 3, "--seed", 11, "--class", 4, "--class", 7,
                           "--out", tmp_path / "imgs", "--quiet")
    assert rc == 0, err
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert [f.name for f in files] == ["00000_seed11.png", "00001_seed12.png", "00002_seed13.png"]
    pipe = latentdiff.load(exported)
    images = pipe.sample(3, seed=11, labels=[4, 7])
    for f, im in zip(files, images):
        np.testing.assert_array_equal(pixels(f), np.asarray(im))
    # A different seed or class gives a different image (the comparison above can fail).
    other = pipe.sample(1, seed=12, labels=[4])[0]
    assert not np.array_equal(np.asarray(other), pixels(files[0]))
    # Image i uses seed + i whatever the batching: one image per batch gives the same images.
    for f, im in zip(files, pipe.sample(3, seed=11, labels=[4, 7], batch_size=1)):
        np.testing.assert_array_equal(np.asarray(im), pixels(f))


def test_api_loads_run_and_model_folders(run, exported):
    ema = latentdiff.load(run["run"]).sample(2, seed=0, output="tensor")
    model = latentdiff.load(exported).sample(2, seed=0, output="tensor")
    raw = latentdiff.load(run["run"], ema=False).sample(2, seed=0, output="tensor")
    assert ema.shape == (2, 1, 8, 8) and ema.dtype == torch.float32
    assert ema.min() >= -1 and ema.max() <= 1
    torch.testing.assert_close(ema, model, rtol=0, atol=0)
    assert not torch.allclose(ema, raw)  # --no-ema / ema=False really loads the trained weights


def test_sampling_uses_the_newest_intact_weights_of_a_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    ckpt = copy / "checkpoints"
    ema2 = load_file(ckpt / "step_0000002" / "ema" / "unet.safetensors")
    ema3 = load_file(ckpt / "step_0000003" / "ema" / "unet.safetensors")
    # Only the weights sampling reads are checked: a damaged optimizer state does not matter.
    (ckpt / "step_0000003" / "optimizers.pt").write_bytes(b"damaged")
    pipe = latentdiff.load(copy)
    assert all(torch.equal(v, ema3[k]) for k, v in pipe.unet.state_dict().items())
    # A damaged EMA file in the newest checkpoint: the one before is used, with a warning naming the file.
    f = ckpt / "step_0000003" / "ema" / "unet.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="using step_0000002.*step_0000003.*truncated or corrupt"):
        pipe = latentdiff.load(copy)
    assert all(torch.equal(v, ema2[k]) for k, v in pipe.unet.state_dict().items())
    # None intact: a clear error, no traceback from the command.
    f = ckpt / "step_0000002" / "ema" / "unet.safetensors"
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(ValueError, match="no complete checkpoint.*step_0000002"):
        latentdiff.load(copy)


def test_import_latentdiff_does_not_import_torch():
    code = ("import sys, latentdiff; assert 'torch' not in sys.modules, 'torch imported'; "
            "import latentdiff.cli; latentdiff.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'cli imports torch'; "
            "assert 'load' in dir(latentdiff) and 'Pipeline' in dir(latentdiff)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import latentdiff.interop

    # latentdiff.load is the one road from a path (latentdiff, diffusers or SD file) to a Pipeline.
    assert latentdiff.load is latentdiff.interop.load and latentdiff.Pipeline is latentdiff.pipeline.Pipeline
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        _ = latentdiff.lod


# ----------------------------------------------------------------------------------------------------------
# Help


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["train", "sample", "export"])
def test_help_of_each_subcommand_explains_every_option_and_default(command, capsys):
    rc, out, err = run_cli(capsys, command, "--help")
    assert rc == 0
    text = " ".join(out.split())  # argparse wraps lines
    parser = _subparsers(cli.build_parser())[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 8, f"{command}: {action.dest} has no help"
        names = action.option_strings or [action.metavar or action.dest]
        assert any(n in text for n in names), f"{command} --help does not mention {names}"
        if action.option_strings:  # every option says what happens when it is not given
            default = action.default
            if default in (None, False):
                assert "default" in action.help, f"{command}: {names[0]} does not state its default"
            else:
                assert f"(default: {default})" in text, f"{command}: {names[0]} default {default!r} not shown"
    assert "(default: None)" not in text and "(default: False)" not in text


def test_top_level_help_lists_commands_and_sample_help_lists_every_sampler(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and all(c in out for c in ("train", "sample", "export"))
    rc, out, _ = run_cli(capsys, "sample", "--help")
    text = " ".join(out.split())
    assert all(name in text for name in SAMPLERS)
    rc, _, err = run_cli(capsys)
    assert rc == 2 and "COMMAND" in err


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, exit status 2, nothing written


def _tiny_variant(tmp_path, old, new) -> Path:
    text = Path(TINY).read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    return path


def test_unknown_config_key_in_file_and_override(tmp_path, capsys):
    bad = _tiny_variant(tmp_path, "  steps: 4\n", "  stepz: 4\n")
    rc, out, err = run_cli(capsys, "train", bad, "--out", tmp_path / "r")
    assert rc == 2 and "bad.yaml" in err and "unknown key 'train.stepz'" in err and "did you mean 'train.steps'" in err
    rc, out, err = run_cli(capsys, "train", TINY, "sample.sampeler=ddim", "--out", tmp_path / "r")
    assert rc == 2 and "unknown key 'sample.sampeler'" in err and "sample.sampler" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_wrong_type_in_file_and_override(tmp_path, capsys):
    bad = _tiny_variant(tmp_path, "  batch_size: 8\n", "  batch_size: eight\n")
    rc, out, err = run_cli(capsys, "train", bad, "--out", tmp_path / "r")
    assert rc == 2 and "train.batch_size must be an int" in err and "'eight'" in err
    rc, out, err = run_cli(capsys, "train", TINY, "train.lr=fast", "--out", tmp_path / "r")
    assert rc == 2 and "train.lr must be a number" in err
    rc, out, err = run_cli(capsys, "train", TINY, "diffusion.prediction=epsilon", "--out", tmp_path / "r")
    assert rc == 2 and "diffusion.prediction" in err and "did you mean 'eps'" in err
    rc, out, err = run_cli(capsys, "train", tmp_path / "missing.yaml")
    assert rc == 2 and "missing.yaml" in err and "not found" in err
    assert not (tmp_path / "r").exists()


def _folder_args(tmp_path, root, *extra):
    return ["train", TINY, "data.name=folder", f"data.root={root}", "data.size=8", "data.channels=1",
            "model.num_classes=null", "train.cond_drop_prob=0", "sample.guidance=1", "train.steps=1",
            "train.batch_size=2", "--out", tmp_path / "run", "--quiet", *extra]


def test_missing_dataset_folder(tmp_path, capsys):
    rc, out, err = run_cli(capsys, *_folder_args(tmp_path, tmp_path / "no_such_folder"))
    assert rc == 2 and "no_such_folder" in err and "does not exist" in err
    (tmp_path / "file.png").write_bytes(b"x")
    rc, out, err = run_cli(capsys, *_folder_args(tmp_path, tmp_path / "file.png"))
    assert rc == 2 and "is not a folder" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_corrupt_image_among_good_ones_is_skipped_counted_and_training_proceeds(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(images / f"good{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really" * 8)
    rc, out, err = run_cli(capsys, *_folder_args(tmp_path, images))
    assert rc == 0, err
    assert "data: 4 images" in out and "1 unreadable image(s) skipped" in out
    assert "trained to step 1" in out
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]
    # The unconditional run samples without extra options (its config was checked before training).
    rc, out, err = run_cli(capsys, "sample", tmp_path / "run", "--num", 2, "--out", tmp_path / "g.png", "--quiet")
    assert rc == 0, err


def test_settings_that_the_model_cannot_honour_fail_before_training(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(images / f"{i}.png")
    args = _folder_args(tmp_path, images)
    for override, message in [
        ("train.cond_drop_prob=0.1", "train.cond_drop_prob"),
        ("sample.guidance=2", "sample.guidance"),
        ("model.num_classes=3", "has no labels"),
        ("model.chanels=4", "unknown key 'model.chanels'"),
    ]:
        rc, out, err = run_cli(capsys, *args, override)
        assert rc == 2 and message in err, (override, err)
    assert not (tmp_path / "run").exists()


def test_sample_from_a_folder_that_is_not_a_run(tmp_path, capsys, run):
    (tmp_path / "empty").mkdir()
    rc, out, err = run_cli(capsys, "sample", tmp_path / "empty", "--out", tmp_path / "x.png")
    assert rc == 2 and "not a latentdiff run or model folder" in err
    rc, out, err = run_cli(capsys, "sample", tmp_path / "nowhere", "--out", tmp_path / "x.png")
    assert rc == 2 and "does not exist" in err
    # A run folder killed before its first checkpoint: config but no weights.
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / CONFIG_FILE).write_bytes((run["run"] / CONFIG_FILE).read_bytes())
    rc, out, err = run_cli(capsys, "sample", tmp_path / "young", "--out", tmp_path / "x.png")
    assert rc == 2 and "neither model.safetensors nor a complete checkpoint" in err
    rc, out, err = run_cli(capsys, "export", tmp_path / "empty", tmp_path / "m")
    assert rc == 2 and "not a run folder" in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "m").exists()
    assert "Traceback" not in err


def test_bad_sample_options(exported, tmp_path, capsys):
    for args, message in [
        (["--class", 12], "out of range 0..9"),
        (["--sampler", "dpmpp_9m"], "dpmpp_9m"),
        (["--num", 0], "num must be >= 1"),
        (["--steps", 0], "steps must be >= 1"),
        (["--guidance", -1], "guidance must be >= 0"),
        (["--batch-size", 0], "batch_size must be >= 1"),
    ]:
        rc, out, err = run_cli(capsys, "sample", exported, *args, "--out", tmp_path / "x.png", "--quiet")
        assert rc == 2 and message in err, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_sample_options_are_resolved_and_checked_by_the_pipeline(exported):
    import dataclasses

    from latentdiff.config import ConfigError
    from latentdiff.eval.scoring import sample_batches
    from latentdiff.pipeline import Pipeline

    pipe = latentdiff.load(exported)
    s = pipe.sample_options(steps=np.int64(3), labels=range(2), eta=0.5, seed=None)
    assert (s.steps, type(s.steps), s.labels, s.eta) == (3, int, [0, 1], 0.5)
    assert (s.sampler, s.seed, s.guidance) == (pipe.config.sample.sampler, pipe.config.sample.seed, 1.5)
    assert pipe.sample_options(labels=7).labels == [7]
    T = pipe.diffusion.num_steps
    for given, message in [
        ({"sampler": "dpmpp_9m"}, "unknown sampler 'dpmpp_9m'; expected one of"),
        ({"steps": T + 1}, f"steps {T + 1} exceeds the model's {T} training steps"),
        ({"labels": [3, 10]}, "class label(s) [10] out of range 0..9"),
        ({"labels": []}, "labels is empty"),
        ({"guidance": -1.0}, "sample options: guidance must be >= 0"),
        ({"eta": -0.5}, "sample options: eta must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            pipe.sample_options(**given)
        with pytest.raises(ConfigError, match=re.escape(message)):  # Pipeline.sample checks through it
            pipe.sample(1, output="tensor", **given)
    with pytest.raises(ConfigError, match="did you mean 'eta'"):
        pipe.sample_options(etaa=0.1)
    config = pipe.config
    config = dataclasses.replace(config, model={**config.model, "num_classes": None},
                                 sample=dataclasses.replace(config.sample, guidance=1.0))
    unconditional = Pipeline.from_config(config)
    with pytest.raises(ConfigError, match="unconditional: it takes no class labels"):
        unconditional.sample_options(labels=[1])
    with pytest.raises(ConfigError, match="guidance needs a class-conditional model"):
        unconditional.sample_options(guidance=2.0)
    # eval counts network calls through a wrapper; the pipeline itself is left as it was.
    record = {}
    batches = list(sample_batches(pipe, 3, steps=2, batch_size=2, record=record))
    assert [len(b) for b in batches] == [2, 1] and record["nfe"] == 2 and "model_fn" not in vars(pipe)


# ----------------------------------------------------------------------------------------------------------
# The installed console script


@pytest.mark.slow
def test_console_script_samples_like_the_api(exported, tmp_path):
    script = Path(sys.executable).with_name("latentdiff")
    if not script.is_file():
        pytest.skip("the latentdiff console script is not installed next to this Python (pip install -e .)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["sample", exported, "--num", 2, "--seed", 3, "--out", tmp_path / "s.png", "--quiet"]
    r = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "loaded" in r.stderr and "wrote a grid of 2 images" in r.stdout
    images = latentdiff.load(exported).sample(2, seed=3, output="tensor")
    from latentdiff.train import make_grid

    np.testing.assert_array_equal(pixels(tmp_path / "s.png"), make_grid(images, nrow=10)[..., 0])
    r = subprocess.run([str(script), "sample", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "not a latentdiff run or model folder" in r.stderr and "Traceback" not in r.stderr
