"""The first stage as a command: train an autoencoder from a config (LDM objective, two optimizers), the
model folder with its latent scale, reconstruct, export, eval (PSNR, SSIM, rFID beside the rFID of other real
images), and the clear outcome of bad input. A tiny autoencoder on 16x16 shapes; the commands run in-process."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from latentdiff import cli
from latentdiff.config import AutoencoderRunConfig, ConfigError, load_config
from latentdiff.eval.metrics import psnr
from latentdiff.eval.reconstruction import evaluate_reconstruction
from latentdiff.first_stage import EXPORT_DIR, load_first_stage, reconstruct
from latentdiff.nn.autoencoder import load_autoencoder, save_autoencoder

from helpers.clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]

TINY_AE = """
autoencoder: {regularizer: kl, ch: 8, ch_mult: [1, 2], num_res_blocks: 1, z_channels: 3, embed_dim: 3, norm_groups: 8}
loss: {rec_loss: l2, disc_start: 3}
discriminator: {ndf: 8, n_layers: 1, norm: group}
data: {name: shapes, size: 16}
train: {steps: 6, batch_size: 8, lr: 2.0e-3, ema_decay: 0.0, checkpoint_every: 3, log_every: 1, mixed_precision: "no"}
eval_num: 16
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny_ae.yaml"
    path.write_text(TINY_AE)
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_config, tmp_path_factory):
    """A run of the tiny autoencoder, trained through the command."""
    run = tmp_path_factory.mktemp("runs") / "ae"
    rc = cli.main(["train", str(tiny_config), "--out", str(run), "--quiet"])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def tiny_shapes_oracle(tmp_path_factory):
    from latentdiff.eval.shapes_oracle import train_shapes_oracle

    folder = tmp_path_factory.mktemp("oracle") / "shapes"
    train_shapes_oracle(folder, n_train=256, n_test=32, epochs=1, batch_size=64, size=16, verbose=False)
    return folder


def test_every_shipped_autoencoder_config_loads_and_builds():
    from latentdiff.first_stage import autoencoder_config

    for f in (2, 4, 8):
        for reg in ("kl", "vq"):
            path = ROOT / "configs" / f"shapes_vae_{reg}_f{f}.yaml"
            config = load_config(path)
            assert isinstance(config, AutoencoderRunConfig)
            resolved = config.__class__(**{**config.__dict__, "data": config.data.__class__(
                **{**config.data.__dict__, "channels": 3, "size": 32})})
            ae_cfg = autoencoder_config(resolved)
            assert (ae_cfg.f, ae_cfg.regularizer, ae_cfg.resolution) == (f, reg, 32)
            assert config.discriminator is not None and config.train.max_minutes == 10


def test_train_writes_checkpoints_and_the_model_folder_with_its_latent_scale(trained_run, capsys):
    assert (trained_run / "config.yaml").is_file()
    steps = sorted(p.name for p in (trained_run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps[-1] == "step_0000006"
    ae = load_autoencoder(str(trained_run / EXPORT_DIR))
    assert ae.latent_scale is not None and ae.latent_scale > 0
    # The scale is 1/std of the latents of the first training batch (posterior samples drawn with train.seed).
    from latentdiff.data import make_dataset
    from latentdiff.first_stage import first_images

    config = load_config(trained_run / "config.yaml")
    x = first_images(make_dataset(config.data), config.train.batch_size)
    z = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(config.train.seed))
    assert ae.latent_scale == pytest.approx(1.0 / float(z.detach().flatten().std()), rel=1e-5)
    # The adversarial term is off before disc_start and on from it: D's loss is 0, then positive.
    rows = (trained_run / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    d_loss = [float(r.split(",")[head.index("loss_discriminator")]) for r in rows[1:]]
    assert d_loss[:3] == [0.0, 0.0, 0.0] and all(v > 0 for v in d_loss[3:])
    assert "g_loss" in head and "d_weight" in head


def test_reconstruct_writes_pairs_and_reports_psnr(trained_run, tmp_path, capsys):
    out = tmp_path / "recon.png"
    rc, stdout, err = run_cli(capsys, "reconstruct", trained_run, "--num", 6, "--nrow", 3, "--out", out)
    assert rc == 0, err
    img = np.asarray(Image.open(out))
    # 6 pairs, 3 per row: 2 rows of 6 images of 16 px with 2 px padding.
    assert img.shape[:2] == (2 + 2 * 18, 2 + 6 * 18)
    # The PSNR printed is the library's on the same images.
    from latentdiff.data import make_dataset

    ae, config, _ = load_first_stage(trained_run)
    test = make_dataset(config.data.__class__(**{**config.data.__dict__, "split": "test"}))
    x = torch.stack([test[i]["image"] for i in range(6)])
    expected = float(psnr(reconstruct(ae, x), x).mean())
    assert f"PSNR {expected:.2f} dB" in stdout


def test_eval_reports_psnr_ssim_and_rfid_with_its_reference(trained_run, tiny_shapes_oracle, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", trained_run, "--num", 32, "--oracle", tiny_shapes_oracle, "--out", out,
                              "--quiet")
    assert rc == 0, err
    result = json.loads(out.read_text())
    m = result["model"]
    assert m["n"] == 32 and m["n_other"] == 32
    assert m["rfid"] > 0 and m["rfid_other_real"] > 0
    assert "PSNR (dB)" in stdout and "rFID (oracle:shapes)" in stdout
    # The figures it must reach: the library's PSNR and SSIM of the same 32 held-out images (posterior means).
    from latentdiff.data import make_dataset
    from latentdiff.eval.metrics import ssim

    ae, config, _ = load_first_stage(trained_run)
    test = make_dataset(config.data.__class__(**{**config.data.__dict__, "split": "test"}))
    x = torch.stack([test[i]["image"] for i in range(32)])
    rec = reconstruct(ae, x)
    assert m["psnr"] == pytest.approx(float(psnr(rec, x).mean()), rel=1e-5)
    assert m["ssim"] == pytest.approx(float(ssim(rec, x).mean()), rel=1e-5, abs=1e-6)


def test_export_then_eval_the_model_folder(trained_run, tmp_path, capsys):
    model = tmp_path / "model"
    rc, stdout, err = run_cli(capsys, "export", trained_run, model)
    assert rc == 0, err
    assert "latent scale" in stdout
    exported, run_ae = load_autoencoder(str(model)), load_autoencoder(str(trained_run / EXPORT_DIR))
    assert exported.latent_scale == pytest.approx(run_ae.latent_scale)
    rc, stdout, err = run_cli(capsys, "eval", model, "--reference", "shapes", "--metrics", "psnr,ssim", "--num", 8,
                              "--quiet")
    assert rc == 0, err
    assert (model / "eval" / "eval_reconstruction_test_8.json").is_file()
    # The exported folder records the data it was trained on: reconstruct and eval find held-out images.
    rc, stdout, err = run_cli(capsys, "reconstruct", model, "--num", 2, "--out", tmp_path / "r.png")
    assert rc == 0 and "2 images of shapes (test)" in stdout, err
    # A folder that records no data asks for it.
    bare = tmp_path / "bare"
    save_autoencoder(load_autoencoder(str(model)), str(bare), data={})
    meta = json.loads((bare / "config.json").read_text())
    del meta["data"]
    (bare / "config.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "reconstruct", bare, "--out", tmp_path / "r.png")
    assert rc == 2 and "--data" in err
    # It is not a diffusion model.
    rc, _, err = run_cli(capsys, "sample", model, "--out", tmp_path / "s.png")
    assert rc == 2 and "autoencoder" in err
    rc, _, err = run_cli(capsys, "eval", model, "--metrics", "fid", "--reference", "shapes")
    assert rc == 2 and "not a metric of an autoencoder" in err


def test_f_that_does_not_divide_the_image_size_is_a_clear_error(tiny_config, tmp_path, capsys):
    run = tmp_path / "bad"
    rc, _, err = run_cli(capsys, "train", tiny_config, "data.size=17", "--out", run, "--quiet")
    assert rc == 2
    assert "f=2" in err and "data.size=17" in err
    assert not run.exists()  # nothing written


def test_bad_autoencoder_sections_are_clear_errors(tiny_config, tmp_path, capsys):
    for override, words in (("autoencoder.chh=4", "did you mean 'autoencoder.ch'"),
                            ("autoencoder.resolution=16", "comes from the data"),
                            ("loss.rec_loss=l3", "loss: unknown rec_loss"),
                            ("discriminator.ndff=8", "did you mean 'discriminator.ndf'"),
                            ("lpips=/nonexistent/lpips.safetensors", "lpips.safetensors not found")):
        rc, _, err = run_cli(capsys, "train", tiny_config, override, "--out", tmp_path / "x", "--quiet")
        assert rc == 2, override
        assert words in err, (override, err)
    with pytest.raises(ConfigError, match="autoencoder.z_channels must be an int"):
        load_config(tiny_config, ["autoencoder.z_channels=three"])


def test_resume_with_another_autoencoder_is_refused(trained_run, tiny_config, capsys):
    rc, _, err = run_cli(capsys, "train", tiny_config, "autoencoder.ch=16", "--out", trained_run, "--resume", "--quiet")
    assert rc == 2 and "another autoencoder" in err


def test_corrupt_autoencoder_weights_are_a_clear_error(trained_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run / EXPORT_DIR, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rc, _, err = run_cli(capsys, "reconstruct", broken, "--data", "shapes", "--out", tmp_path / "r.png")
    assert rc == 2 and "corrupt autoencoder weights" in err and str(weights) in err
    assert not (tmp_path / "r.png").exists()


class _Identity(nn.Module):
    """An 'autoencoder' that reproduces its input exactly."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.config = type("C", (), {"in_channels": 3})()

    def encode(self, x, sample=False, generator=None):
        return x

    def decode(self, z):
        return z


def test_reconstruction_metrics_of_a_perfect_and_a_degraded_autoencoder(tiny_shapes_oracle):
    from latentdiff.eval.run import load_any_oracle
    from latentdiff.eval.shapes_oracle import shapes_arrays

    net = load_any_oracle(tiny_shapes_oracle)
    x, _ = shapes_arrays("test", 24, size=16)
    other, _ = shapes_arrays("train", 24, size=16)
    perfect = evaluate_reconstruction(_Identity(), x, net=net, other_images=other)
    assert perfect["rfid"] == pytest.approx(0.0, abs=1e-6) and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["psnr"] == float("inf") and perfect["rfid_other_real"] > 0

    class Blurry(_Identity):
        def decode(self, z):
            return torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)

    blurry = evaluate_reconstruction(Blurry(), x, net=net, other_images=other)
    assert 10 < blurry["psnr"] < 40 and blurry["ssim"] < 0.99 and blurry["rfid"] > 0
    with pytest.raises(ValueError, match="NaN"):
        evaluate_reconstruction(_Identity(), x * float("nan"), metrics=("psnr",))
    with pytest.raises(ValueError, match=r"takes \(3, H, W\)"):
        evaluate_reconstruction(_Identity(), x[:, :1], metrics=("psnr",))


def test_time_budget_stops_with_a_checkpoint_and_resumes(tiny_config, tmp_path, capsys):
    run = tmp_path / "timed"
    # 0.0001 min = 6 ms: the first step already takes longer, so the loop stops after it.
    rc, out, err = run_cli(capsys, "train", tiny_config, "train.max_minutes=0.0001", "--out", run, "--quiet")
    assert rc == 0, err
    assert "stopped at step 1 of 6" in out and "train.max_minutes" in out
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_0000001"]
    assert (run / EXPORT_DIR / "model.safetensors").is_file()
    rc, out, err = run_cli(capsys, "train", tiny_config, "--out", run, "--resume", "--quiet")
    assert rc == 0, err
    assert "resumed from" in out and "trained to step 6" in out
    with pytest.raises(ConfigError, match="train.max_minutes must be >= 0"):
        load_config(tiny_config, ["train.max_minutes=-1"])
