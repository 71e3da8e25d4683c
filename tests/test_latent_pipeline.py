"""Latent diffusion as a composition (DESIGN: pipeline.py): a diffusion config whose ``latent.first_stage``
names an autoencoder folder trains the U-Net on scaled latents s·ℰ(x), samples latents and decodes them;
the run and the exported model carry their own copy of the first stage. A tiny untrained autoencoder (f = 2)
on 16x16 shapes; the commands run in-process."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff import cli
from latentdiff.config import ConfigError, load_config
from latentdiff.data import make_dataset
from latentdiff.first_stage import first_images
from latentdiff.nn.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    compute_latent_scale,
    load_autoencoder,
    save_autoencoder,
)
from latentdiff.pipeline import FIRST_STAGE_DIR, Pipeline

from helpers.clitools import run_cli

CONFIG = """
model: {{preset: tiny, num_classes: null}}
diffusion: {{schedule: cosine, num_steps: 50}}
data: {{name: shapes, size: 16}}
latent: {{first_stage: {ae}, sample_posterior: false}}
train: {{steps: 3, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, checkpoint_every: 3, log_every: 1, mixed_precision: "no"}}
sample: {{sampler: ddim, steps: 3, num: 2, batch_size: 2}}
"""


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """The latent caches of these runs stay in a temporary folder, not in ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16))
    folder = tmp_path_factory.mktemp("ae") / "kl_f2"
    x = first_images(make_dataset("shapes", size=16), 8)
    save_autoencoder(ae, str(folder), latent_scale=compute_latent_scale(ae, x, torch.Generator().manual_seed(0)))
    return folder


@pytest.fixture(scope="module")
def config_file(first_stage, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "ldm.yaml"
    path.write_text(CONFIG.format(ae=first_stage))
    return path


@pytest.fixture(scope="module")
def run(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ldm"
    assert cli.main(["train", str(config_file), "--out", str(out), "--quiet"]) == 0
    return out


def test_the_run_carries_its_first_stage_and_trains_on_its_latents(run, first_stage):
    saved = load_config(run / "config.yaml")
    assert saved.latent.first_stage == FIRST_STAGE_DIR
    copy, original = load_autoencoder(str(run / FIRST_STAGE_DIR)), load_autoencoder(str(first_stage))
    assert copy.latent_scale == pytest.approx(original.latent_scale)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), original.state_dict().values()))
    pipe = latentdiff.load(run)
    assert pipe.sample_shape == (3, 8, 8) and pipe.image_shape == (3, 16, 16)
    assert pipe.unet.config.in_channels == 3 and pipe.unet.config.out_channels == 3
    # encode is s·ℰ(x) (the posterior mean here: sample_posterior false), decode is 𝒟(z/s).
    x = first_images(make_dataset("shapes", size=16, split="test"), 4)
    z = pipe.encode(x)
    expected = original.encode(x, sample=False) * original.latent_scale
    assert torch.allclose(z, expected, atol=1e-6)
    assert torch.allclose(pipe.decode(z), original.decode(expected / original.latent_scale).clamp(-1, 1), atol=1e-6)


def test_sampling_draws_latents_and_decodes_them(run, tmp_path, capsys):
    moved = tmp_path / "moved_run"
    shutil.copytree(run, moved)  # the run is self-contained: it does not need the original first stage folder
    out = tmp_path / "grid.png"
    rc, _, err = run_cli(capsys, "sample", moved, "--num", 4, "--nrow", 2, "--out", out, "--quiet")
    assert rc == 0, err
    img = np.asarray(Image.open(out))
    assert img.shape == (2 + 2 * 18, 2 + 2 * 18, 3)  # 16x16 RGB images, not 8x8 latents
    pipe = latentdiff.load(moved)
    seen = {}
    pipe_decode = pipe.decode
    pipe.decode = lambda z: seen.setdefault("z", z) is not None and pipe_decode(z)
    images = pipe.sample(2, output="tensor", seed=5)
    assert seen["z"].shape == (2, 3, 8, 8) and images.shape == (2, 3, 16, 16)
    assert torch.equal(images, pipe_decode(seen["z"]).float().cpu())


def test_export_keeps_the_first_stage_and_the_same_samples(run, tmp_path, capsys):
    model = tmp_path / "model"
    rc, _, err = run_cli(capsys, "export", run, model)
    assert rc == 0, err
    assert (model / FIRST_STAGE_DIR / "model.safetensors").is_file()
    a = latentdiff.load(run).sample(2, output="tensor", seed=3)
    b = latentdiff.load(model).sample(2, output="tensor", seed=3)
    assert torch.equal(a, b)


def test_bad_first_stage_settings_are_clear_errors(config_file, first_stage, tmp_path, capsys):
    cases = [
        (["latent.first_stage=/nonexistent/ae"], "latent.first_stage: /nonexistent/ae does not exist"),
        (["data.size=15"], "f=2, which does not divide data.size=15"),
        (["data.name=digits", "data.size=8"], "takes 3-channel images; the data has 1"),
        (["sample.clip_x0=true"], "sample.clip_x0"),
        (["latent.scale=0"], "latent.scale must be > 0"),
    ]
    for overrides, words in cases:
        out = tmp_path / "x"
        rc, _, err = run_cli(capsys, "train", config_file, *overrides, "--out", out, "--quiet")
        assert rc == 2, overrides
        assert words in err, (overrides, err)
        assert not (out / "checkpoints").exists()


def test_bits_per_dim_is_refused_for_a_latent_model(run, capsys):
    rc, _, err = run_cli(capsys, "eval", run, "--metrics", "bpd", "--num", 2, "--quiet")
    assert rc == 2 and "latent space" in err


def test_pixel_models_are_unchanged(tmp_path):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml")
    assert config.latent.first_stage is None
    from latentdiff.train.run import resolve_data

    _, config = resolve_data(config)
    pipe = Pipeline.from_config(config)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert pipe.autoencoder is None and torch.equal(pipe.encode(x), x) and pipe.sample_shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="latent.first_stage"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml", ["latent.first_stagee=x"])


def test_a_latent_model_warns_when_sampling_starts_at_an_extreme_sigma(run):
    pipe = latentdiff.load(run)  # cosine schedule: 1/sqrt(alpha_bar_{T-1}) is in the thousands
    with pytest.warns(UserWarning, match="blow up"):
        pipe.sample(1, output="tensor", spacing="trailing")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.sample(1, output="tensor", spacing="leading")
