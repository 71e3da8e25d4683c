"""`latentdiff eval` and `latentdiff oracle` end to end, in-process, on a tiny run (configs/tiny_test.yaml with
T = 20): the table and its JSON, the floor beside each figure, reuse of a statistics file, two image
folders compared, bits per dimension, the clear error of each kind of bad input, and
benchmarks/quality_vs_steps.py on the same run. The figures are recomputed here through the library to
check the glue (seeds, label cycling, splits), not only that numbers appear."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff import cli
from latentdiff.data import Digits
from latentdiff.eval import (
    OracleConfig,
    class_accuracy,
    extract_stats,
    fid_from_stats,
    load_oracle,
    load_stats,
    quantize_8bit,
    save_oracle,
    split_stats,
)
from latentdiff.eval import run as ev
from latentdiff.eval.oracle import Oracle
from latentdiff.pipeline import to_pil

from helpers.clitools import captured as _captured
from helpers.clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_test.yaml")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A trained tiny run (T = 20, 10 classes) and a quickly trained digits oracle in a private cache."""
    root = tmp_path_factory.mktemp("evalcli")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTDIFF_CACHE", str(cache))
        mp.delenv("LATENTDIFF_FID_WEIGHTS", raising=False)
        trained = _captured("train", TINY, "train.steps=1", "diffusion.num_steps=20", "--out", root / "run", "--quiet")
        oracle = _captured("oracle", "digits", "--epochs", 3)
        yield {"root": root, "run": root / "run", "cache": cache, "trained": trained, "oracle": oracle}


def test_oracle_command_trains_saves_and_reports_accuracy(env):
    rc, out, err = env["oracle"]
    assert env["trained"][0] == 0, env["trained"][2]
    assert rc == 0, err
    folder = env["cache"] / "oracles" / "digits"
    oracle = load_oracle(folder)
    acc = oracle.info["test_accuracy"]
    assert f"test accuracy {acc:.4f} on 359 held-out" in out and str(folder) in out
    assert acc > 0.5  # 3 epochs: well above chance (0.1), the number printed is the saved one


def test_digits_oracle_is_trained_on_first_use_then_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "c"))
    assert ev.cache_root() == tmp_path / "c"
    first = ev.digits_oracle_cached(epochs=1)
    assert "first use" in capsys.readouterr().out
    weights = tmp_path / "c" / "oracles" / "digits" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = ev.digits_oracle_cached(epochs=1)
    assert "first use" not in capsys.readouterr().out and weights.stat().st_mtime_ns == stamp
    assert again.fingerprint() == first.fingerprint()


@pytest.fixture(scope="module")
def evaluated(env):
    """`latentdiff eval` of the tiny run, once per module: (exit status, stdout, stderr) and its JSON result.
    Every test that needs the result takes this fixture (none depends on another test having run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTDIFF_CACHE", str(env["cache"]))
        mp.delenv("LATENTDIFF_FID_WEIGHTS", raising=False)
        rc, out, err = _captured("eval", env["run"], "--num", 24, "--sampler", "ddim", "--steps", 2, "--seed", 7,
                                 "--quiet")
    path = env["run"] / "eval" / "eval_ddim_2_g1.5_oracle-digits.json"
    return {"rc": rc, "out": out, "err": err, "path": path,
            "result": json.loads(path.read_text()) if rc == 0 else None}


def test_eval_table_json_and_floor_match_the_library(env, evaluated):
    rc, out, err = evaluated["rc"], evaluated["out"], evaluated["err"]
    assert rc == 0, err
    path = env["run"] / "eval" / "eval_ddim_2_g1.5_oracle-digits.json"
    assert f"wrote {path}" in out
    result = json.loads(path.read_text())
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]  # atomic write left nothing behind
    m, f = result["model"], result["floor"]
    # The table: each figure of the model beside its floor.
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines()}
    for row, key in [("FID", "fid"), ("precision", "precision"), ("class accuracy", "accuracy")]:
        shown = [float(v) for v in lines[row][len(row):].split()]
        expected = [pytest.approx(m[key], rel=2e-3, abs=1e-3), pytest.approx(f[key], rel=2e-3, abs=1e-3)]
        assert shown == expected, (row, out)
    assert "KID x 1e3" in out and "IS" in lines and "real floor (24 vs" in out
    # Recompute through the library: same seeds, labels cycling over the 10 classes, the cached reference.
    stats_file = Path(result["reference"]["stats_file"])
    assert f"reference statistics: {stats_file}" in out and stats_file.parent == env["cache"] / "fid_stats"
    ref, _ = load_stats(stats_file)
    assert ref.n == result["reference"]["n"] == len(Digits(8, "train"))
    oracle = load_oracle(env["cache"] / "oracles" / "digits")
    labels = [i % 10 for i in range(24)]
    images = latentdiff.load(env["run"]).sample(24, labels=labels, sampler="ddim", steps=2, seed=7, output="tensor")
    fake = extract_stats(oracle, images)
    assert m["fid"] == pytest.approx(fid_from_stats(ref, fake), rel=1e-6)  # float32 features, other batching
    assert m["accuracy"] == pytest.approx(class_accuracy(fake.logits, labels))
    rest, part = split_stats(ref, 24, seed=7)
    assert (f["n_fake"], f["n_real"]) == (24, ref.n - 24)
    assert f["fid"] == pytest.approx(fid_from_stats(rest, part), rel=1e-9)
    assert f["accuracy"] == oracle.info["test_accuracy"]
    assert 0 <= f["fid"] < m["fid"]  # two sampling steps of a 1-step-trained model are far from real digits
    assert result["nfe"] == 2 and result["sampling"]["guidance"] == 1.5 and result["num"] == 24
    env["result"] = result


def test_a_statistics_file_is_reused_as_reference_and_checked(env, evaluated, capsys, tmp_path):
    assert evaluated["rc"] == 0, evaluated["err"]
    env["result"] = evaluated["result"]
    stats_file = Path(env["result"]["reference"]["stats_file"])
    stamp = stats_file.stat().st_mtime_ns
    rc, out, err = run_cli(capsys, "eval", env["run"], "--num", 24, "--sampler", "ddim", "--steps", 2, "--seed", 7,
                           "--reference", stats_file, "--out", tmp_path / "r.json", "--quiet")
    assert rc == 0, err
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["model"]["fid"] == pytest.approx(env["result"]["model"]["fid"], rel=1e-12)
    assert again["floor"]["fid"] == pytest.approx(env["result"]["floor"]["fid"], rel=1e-12)
    assert again["reference"]["kind"] == "stats" and stats_file.stat().st_mtime_ns == stamp
    # Statistics of another feature network are refused, naming both.
    other = tmp_path / "other_oracle"
    save_oracle(Oracle(OracleConfig()), other)
    rc, out, err = run_cli(capsys, "eval", env["run"], "--num", 4, "--oracle", other, "--reference", stats_file,
                           "--quiet")
    assert rc == 2 and "another feature network" in err and str(stats_file) in err


def _write_images(folder: Path, images: torch.Tensor):
    folder.mkdir(parents=True)
    for i, im in enumerate(to_pil(images)):
        im.save(folder / f"{i:03d}.png")


def test_two_folders_compared_with_a_floor(env, capsys, tmp_path):
    train, test = Digits(8, "train"), Digits(8, "test")
    _write_images(tmp_path / "real", train.images[:120])
    _write_images(tmp_path / "digits", test.images[:40])
    noise = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _write_images(tmp_path / "noise", noise)
    fids = {}
    for fake in ("digits", "noise"):
        rc, out, err = run_cli(capsys, "eval", "--real", tmp_path / "real", "--fake", tmp_path / fake,
                               "--features", "oracle", "--metrics", "fid,kid,pr", "--out", tmp_path / f"{fake}.json",
                               "--quiet")
        assert rc == 0, err
        r = json.loads((tmp_path / f"{fake}.json").read_text())
        assert r["num"] == 40 and r["reference"]["n"] == 120 and r["reference"]["kind"] == "folder"
        assert r["floor"]["n_fake"] == 40 and "FID" in out and "real floor (40 vs 80)" in out
        assert "accuracy" not in r["model"] and "is_mean" not in r["model"]  # not asked for
        fids[fake] = r["model"]["fid"]
        # Noise lies off the digits' manifold. With the real set cut to the 40 samples (equal sizes), the noise's
        # features (clumped near the real mean by a 3-epoch oracle) fall inside the real k-NN balls and it is
        # recall that drops (0.075 here, floor 1.0); against all 120 real images precision had caught it too.
        pr = r["model"]["precision"], r["model"]["recall"]
        assert (min(pr) > 0.5) == (fake == "digits"), (fake, pr)
        assert r["model"]["pr_real"] == r["floor"]["pr_real"] == 40
    assert fids["digits"] < fids["noise"]  # real held-out digits score better than noise
    assert fids["digits"] < 3 * r["floor"]["fid"] + 1
    # No --out: the table is printed, nothing is written.
    before = sorted(tmp_path.iterdir())
    rc, out, err = run_cli(capsys, "eval", "--real", tmp_path / "real", "--fake", tmp_path / "noise",
                           "--features", "oracle", "--metrics", "fid", "--quiet")
    assert rc == 0 and "FID" in out and "KID" not in out and sorted(tmp_path.iterdir()) == before


def test_bits_per_dim_on_the_tiny_run(env, capsys):
    rc, out, err = run_cli(capsys, "eval", env["run"], "--metrics", "bpd", "--num", 5, "--batch-size", 5,
                           "--seed", 3, "--quiet")
    assert rc == 0, err
    b = json.loads((env["run"] / "eval" / "eval_bpd.json").read_text())["bpd"]
    for row in ("bits/dim", "prior L_T", "decoder L_0"):
        assert row in out
    assert b["n"] == 5 and b["split"] == "test" and b["conditional"]
    assert b["total"] == pytest.approx(b["prior"] + b["diffusion"] + b["decoder"], rel=1e-9)
    # The same bound through GaussianDiffusion directly: same images, same noise, true classes.
    pipe = latentdiff.load(env["run"])
    ds = Digits(8, "test")
    x0 = quantize_8bit(ds.images[:5])
    y = torch.tensor([int(t) for t in ds.targets[:5]])
    direct = pipe.diffusion.bits_per_dim(pipe.model_fn, x0, clip_x0=True, generator=torch.Generator().manual_seed(3),
                                         y=y)
    assert b["total"] == pytest.approx(direct["total"].mean().item(), rel=1e-9)
    assert b["decoder"] == pytest.approx(direct["terms"][:, 0].mean().item(), rel=1e-9)
    pipe.autoencoder = object()  # a latent model: no bound on image likelihood
    with pytest.raises(ValueError, match="pixel-space"):
        ev.bits_per_dim(pipe, ds, 2)


def test_bad_input_gives_one_clear_line(env, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty2").mkdir()
    run = env["run"]
    before = sorted((run / "eval").iterdir()) if (run / "eval").exists() else []
    cases = [
        (["eval", run, "--metrics", "fid,lpips"], ["unknown metric", "'lpips'"]),
        (["eval", run, "--metrics", ","], ["no metric given"]),
        (["eval", run, "--reference", tmp_path / "nope.npz"], ["nope.npz", "not found"]),
        (["eval", run, "--reference", tmp_path / "empty"], ["no images", "empty"]),
        (["eval", run, "--features", "inception"],
         ["no FID Inception weights given", "--fid-weights", "LATENTDIFF_FID_WEIGHTS"]),
        (["eval", run, "--features", "inception", "--fid-weights", tmp_path / "w.pth"],
         ["weights file not found", "w.pth"]),
        (["eval", "--real", tmp_path / "empty", "--fake", tmp_path / "empty2", "--features", "oracle"],
         ["no images", "empty2"]),
        (["eval", "--real", tmp_path / "empty"], ["--real and --fake go together"]),
        (["eval", run, "--real", tmp_path / "empty", "--fake", tmp_path / "empty2"], ["not both"]),
        (["eval", "--real", tmp_path / "empty", "--fake", tmp_path / "empty2", "--metrics", "bpd"],
         ["bpd needs a model"]),
        (["eval"], ["give a run or model folder"]),
        (["eval", run, "--sampler", "dpmpp_9m"], ["unknown sampler", "dpmpp_9m"]),
        (["eval", run, "--steps", 50], ["exceeds the model's 20 training steps"]),
        (["eval", run, "--num", 0], ["--num must be >= 1"]),
        (["eval", tmp_path / "empty"], ["not a latentdiff run or model folder"]),
        (["oracle", "digits", "--epochs", 0], ["--epochs must be >= 1"]),
    ]
    for args, messages in cases:
        rc, out, err = run_cli(capsys, *args, "--quiet") if args[0] == "eval" else run_cli(capsys, *args)
        assert rc == 2, (args, out, err)
        assert all(msg in err for msg in messages), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    after = sorted((run / "eval").iterdir()) if (run / "eval").exists() else []
    assert after == before  # nothing written


def test_unknown_metric_names_are_rejected_by_the_library():
    assert ev.parse_metrics("bpd, FID,kid") == ["fid", "kid", "bpd"]
    with pytest.raises(ValueError, match="'lpips'"):
        ev.parse_metrics(["fid", "lpips"])


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["eval", "oracle"])
def test_help_explains_every_option_and_default(command, capsys):
    rc, out, err = run_cli(capsys, command, "--help")
    assert rc == 0
    text = " ".join(out.split())
    for action in _subparsers(cli.build_parser())[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 8, f"{command}: {action.dest} has no help"
        names = action.option_strings or [action.metavar or action.dest]
        assert any(n in text for n in names), f"{command} --help does not mention {names}"
        if action.option_strings:
            if action.default in (None, False):
                assert "default" in action.help, f"{command}: {names[0]} does not state its default"
            else:
                assert f"(default: {action.default})" in text, f"{command}: {names[0]} default not shown"


# ----------------------------------------------------------------------------------------------------------
# benchmarks/quality_vs_steps.py


def _benchmark():
    spec = importlib.util.spec_from_file_location("quality_vs_steps", ROOT / "benchmarks" / "quality_vs_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_benchmark_end_to_end_on_the_tiny_run(env, tmp_path, capsys):
    bench = _benchmark()
    assert bench.parse_grid("ddim:2,5; heun:2") == {"ddim": [2, 5], "heun": [2]}
    runs, notes = bench.clamp_grid(bench.GRID, 20)
    assert ("ddpm", 20) in runs and runs.count(("ddim", 20)) == 1 and any("ddpm 1000 steps -> 20" in n for n in notes)
    capsys.readouterr()
    rc = bench.main([str(a) for a in ["--model", env["run"], "--num", 8, "--grid", "ddpm:1000;ddim:2,4;heun:2",
                                      "--out", tmp_path, "--quiet"]])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "quality_vs_steps.json").read_text())
    got = [(r["sampler"], r["steps"], r["nfe"]) for r in result["results"]]
    # heun: 2 calls per step but the last
    assert got == [("ddpm", 20, 20), ("ddim", 2, 2), ("ddim", 4, 4), ("heun", 2, 3)]
    assert all(r["fid"] > 0 and r["sample_seconds"] > 0 and 0 <= r["accuracy"] <= 1 for r in result["results"])
    assert result["floor"]["n_fake"] == 8 and result["guidance"] == 1.5
    assert "| ddim | 4 | 4 |" in out and "real data (floor" in out
    png = Image.open(tmp_path / "quality_vs_steps.png")
    assert png.format == "PNG" and png.size[0] > 300
    assert (tmp_path / "quality_vs_steps.md").read_text().count("\n| ") == 7  # header, rule, 4 runs, the floor
    # The sweep's ddim row is what `latentdiff eval` reports for the same settings.
    r = ev.evaluate_model(latentdiff.load(env["run"]), load_oracle(env["cache"] / "oracles" / "digits"),
                          ev.load_reference(None, load_oracle(env["cache"] / "oracles" / "digits"),
                                            pipe=latentdiff.load(env["run"]), cache=env["cache"]),
                          metrics=["fid"], num=8, sampler="ddim", steps=4, seed=0)
    assert r["model"]["fid"] == pytest.approx(result["results"][2]["fid"], rel=1e-9)
    # A missing model: the message says what to do.
    rc = bench.main(["--model", str(tmp_path / "nowhere")])
    assert rc == 2 and "run `make demo-digits` first" in capsys.readouterr().err


def test_devices_and_image_folders_do_not_need_eval(tmp_path):
    """default_device and folder_dataset live below eval (eval.run re-exports them for older imports)."""
    import os
    import subprocess
    import sys

    Image.new("RGB", (12, 10)).save(tmp_path / "a.png")
    code = ("import sys; from latentdiff.devices import default_device; from latentdiff.data.folder import "
            "folder_dataset; ds = folder_dataset(sys.argv[1]); print(default_device('cpu'), ds.size, len(ds)); "
            "print(sorted(m for m in sys.modules if m.startswith('latentdiff.eval')))")
    env = {**os.environ, "PYTHONPATH": str(Path(latentdiff.__file__).parents[1])}  # this checkout's latentdiff
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                         env=env).stdout
    assert out.splitlines() == ["cpu (10, 10) 1", "[]"]
    assert ev.default_device is latentdiff.devices.default_device
    assert ev.folder_dataset.__module__ == "latentdiff.data.folder"
