"""The pixel twin of the text-to-image recipe (f = 1) and the report of benchmarks/ldm_vs_pixel.py (issue 12,
"Figures": latent vs pixel diffusion for the same training wall time)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from latentdiff.config import load_config
from latentdiff.nn.attention import SpatialTransformer
from latentdiff.pipeline import Pipeline, load
from latentdiff.recipes import RECIPES
from latentdiff.train.run import resolve_data, tokenizer_for_run, train_from_config

ROOT = Path(__file__).resolve().parents[1]
PIXEL = RECIPES / "shapes_pixel_txt2img.yaml"
LATENT = RECIPES / "shapes_ldm_txt2img.yaml"
SMALL = ["data.options.length=64", "conditioning.vocab_pool=64", "train.batch_size=4", "train.max_minutes=0"]


def _bench():
    spec = importlib.util.spec_from_file_location("ldm_vs_pixel", ROOT / "benchmarks" / "ldm_vs_pixel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not LATENT.is_file(), reason="the latent text recipe is not in this checkout")
def test_the_pixel_recipe_is_the_latent_one_without_a_first_stage():
    pixel, latent = load_config(PIXEL), load_config(LATENT)
    assert pixel.latent.first_stage is None and latent.latent.first_stage is not None
    for section in ("conditioning", "data", "diffusion"):
        assert getattr(pixel, section) == getattr(latent, section), section
    assert dataclasses.replace(pixel.train, out_dir="") == dataclasses.replace(latent.train, out_dir="")
    assert dataclasses.replace(pixel.sample, clip_x0=False) == latent.sample and pixel.sample.clip_x0
    # The latent U-Net's levels sit inside the pixel one: same widths at 8x8 and 4x4, transformers there.
    assert pixel.model["channel_mult"][-2:] == [1, 2] and latent.model["channel_mult"] == [1, 2]


def test_the_pixel_unet_has_its_spatial_transformers_at_8x8_and_4x4(tmp_path):
    config = load_config(PIXEL, SMALL)
    dataset, config = resolve_data(config)
    pipe = Pipeline.from_config(config, tokenizer=tokenizer_for_run(config, dataset, tmp_path, False))
    assert pipe.autoencoder is None and pipe.sample_shape == (3, 32, 32)
    grids = []
    hooks = [m.register_forward_hook(lambda m, args, out: grids.append(tuple(args[0].shape[-2:])))
             for m in pipe.unet.modules() if isinstance(m, SpatialTransformer)]
    with torch.no_grad():
        cond = pipe.conditioner({"prompt": ["a red circle at the top left"]})  # context = τ_θ(y)
        pipe.unet(torch.randn(1, 3, 32, 32), torch.tensor([10]), **cond)
    for h in hooks:
        h.remove()
    assert sorted(set(grids)) == [(4, 4), (8, 8)]


def test_a_two_step_pixel_run_samples_prompts(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    config = load_config(PIXEL, [*SMALL, "train.steps=2", "train.checkpoint_every=2"])
    assert train_from_config(config, tmp_path / "run", progress=False).step == 2
    pipe = load(tmp_path / "run")
    x = pipe.sample(2, prompts=["a red circle at the top left", "a blue square in the centre"], steps=2, seed=0,
                    output="tensor")
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert not torch.equal(x[0], x[1])


def _arm(space, params, steps, seconds, s_step, s_sample, rates, fid):
    tags = ["one object", "two objects", "overall"]
    report = lambda rates: {t: {"rate": r, "passed": int(4 * r), "count": 4} for t, r in zip(tags, rates)}  # noqa
    latent = space == "3x8x8"
    return {"space": space, "params": params, "steps": steps, "step_cap": 2 * steps, "train_seconds": seconds,
            "seconds_per_step": s_step, "setup_seconds": 1.0, "seconds_per_sample": s_sample, "guidance": 3.0,
            "model": report(rates), "real": report([1.0, 1.0, 1.0]), "ceiling": report([1.0, 0.75, 0.875]) if latent
            else None, "fid": {"model": fid, "floor": 0.5, "ceiling": 0.75 if latent else None},
            "precision": {"model": 0.5, "floor": 0.9, "ceiling": 0.8 if latent else None},
            "recall": {"model": 0.4, "floor": 0.8, "ceiling": 0.7 if latent else None}}


def test_the_report_gives_each_arm_and_the_latent_over_pixel_ratios():
    bench = _bench()
    results = {"latent_cache": _arm("3x8x8", 1.1e6, 400, 60.0, 0.15, 0.01, [1.0, 0.5, 0.75], 2.0),
               "latent_nocache": _arm("3x8x8", 1.1e6, 200, 60.0, 0.3, 0.01, [0.75, 0.25, 0.5], 4.0),
               "pixel": _arm("3x32x32", 1.4e6, 100, 60.0, 0.6, 0.04, [0.5, 0.25, 0.375], 8.0)}
    text = bench.table(results, {"note": "reused from ae"}, 1.0, 20, 2)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ")}
    head = rows[""]
    assert head == ["latent f=4, cache on", "latent f=4, cache off", "pixel f=1", "latent f=4, cache on / pixel",
                    "latent f=4, cache off / pixel", "real data", "f=4 first stage (b)"]
    assert rows["training steps reached"] == ["400", "200", "100", "4.00", "2.00", "", ""]
    assert rows["train.steps (the cap; calibrated to end after the time budget)"][:3] == ["800", "400", "200"]
    assert rows["s / training step (batch 64)"][3:5] == ["0.25", "0.50"]
    assert rows["adherence, two objects"] == ["50.0%", "25.0%", "25.0%", "2.00", "1.00", "100.0%", "75.0%"]
    assert rows["FID (oracle features)"][3:] == ["0.25", "0.50", "0.5", "0.75"]
    assert rows["latents / pixels the U-Net denoises"][3:5] == ["-", "-"]
    assert "reused from ae" in text and "1 min" in text
    # Without the pixel arm: no ratios; without a latent arm: no ceiling.
    only = bench.table({"latent_cache": results["latent_cache"]}, {"note": "x"}, 1.0, 20, 2)
    assert only.splitlines()[0].count("|") == 5 and "cache on / pixel" not in only
    pixel = bench.table({"pixel": results["pixel"]}, {"note": "x"}, 1.0, 20, 2)
    assert [line.split("|")[-2].strip() for line in pixel.splitlines() if line.startswith("| adherence")] == ["-"] * 3


def test_the_first_stage_time_is_summed_from_its_metrics(tmp_path):
    bench = _bench()
    (tmp_path / "metrics.csv").write_text("step,loss,steps_per_s\n50,1.0,2.0\n100,0.5,5.0\n")
    (tmp_path / "autoencoder").mkdir()
    assert bench.first_stage_seconds(tmp_path) == pytest.approx(35.0)
    assert bench.first_stage_seconds(tmp_path / "autoencoder") == pytest.approx(35.0)  # a run's model folder
    assert bench.first_stage_seconds(tmp_path / "autoencoder" / "nothing") is None
