"""The training loop: loss falls, exact resume after SIGKILL, data parallel == bigger batch, broken checkpoints,
NaN stops, EMA and lr warm-up math, conditioning dropout, sample grids, several optimizers."""

import csv
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from latentdiff.train import (
    EMA,
    CheckpointError,
    DiffusionObjective,
    Objective,
    TrainConfig,
    TrainingDiverged,
    ema_decay,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_models,
    lr_factor,
    save_grid,
    train,
    verify_checkpoint,
)
from latentdiff.train.checkpoint import _torch_load

from helpers.train_ddp_script import Pairs, Regression, run_regression
from helpers.train_tiny import TinyDenoiser, ToyImages, make_objective

TESTS = Path(__file__).parent
PYTHON = sys.executable


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Config, schedules, EMA math


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match=r"TrainConfig: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(TypeError, match="steps"):
        TrainConfig(steps=1.5)
    assert TrainConfig.from_dict({"betas": [0.9, 0.99]}).betas == (0.9, 0.99)


def test_lr_warmup_and_decay():
    f = lambda s, sched="constant": lr_factor(s, warmup_steps=4, schedule=sched, total_steps=14)  # noqa: E731
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(4, "cosine") == pytest.approx(1.0) and f(9, "cosine") == pytest.approx(0.5)
    assert f(14, "cosine") == pytest.approx(0.0)
    assert f(9, "linear") == pytest.approx(0.5)
    assert lr_factor(0, warmup_steps=0, schedule="constant", total_steps=10) == 1.0


def test_ema_math():
    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 1000) == 0.9 and ema_decay(0.999, 0, warmup=False) == 0.999
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.update(model) == pytest.approx(d)
        for k, v in model.named_parameters():
            expected[k] = d * expected[k] + (1 - d) * v.detach()
    for k, v in ema.model.named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ema.model[1].running_mean, model[1].running_mean)  # buffers are copied
    assert not any(p.requires_grad for p in ema.model.parameters()) and ema.num_updates == 4


# ----------------------------------------------------------------------------------------------------------
# The diffusion objective


def test_diffusion_objective_protocol_dropout_and_resampler_state():
    obj = make_objective(T=10, num_classes=4, cond_drop_prob=1.0, sampler="loss_second_moment")
    assert isinstance(obj, Objective)
    assert obj.optimizers == {"model": ["unet"]} and obj.ema == ["unet"] and list(obj.models) == ["unet"]
    batch = {"image": torch.rand(6, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    seen = {}
    model = obj.models["unet"]
    obj.models["unet"] = lambda x, t, **c: (seen.update(c), model(x, t, **c))[1]
    losses, logs = obj.losses(batch, 0)
    assert torch.equal(seen["y"], torch.full((6,), 4))  # all dropped to the null class id
    assert set(losses) == {"model"} and losses["model"].ndim == 0 and "mse" in logs
    assert int(obj.diffusion.timestep_sampler.counts.sum()) == 6  # per-sample losses fed to importance sampling
    state = obj.state_dict()
    other = make_objective(T=10, sampler="loss_second_moment")
    other.load_state_dict(state)
    assert np.array_equal(other.diffusion.timestep_sampler.counts, obj.diffusion.timestep_sampler.counts)

    obj.cond_drop_prob = 0.0
    obj.losses(batch, 0)
    assert torch.equal(seen["y"], batch["label"])
    obj.cond_drop_prob = 0.5
    torch.manual_seed(0)
    cond, clean = obj._condition({"label": torch.zeros(4000, dtype=torch.long)}, 4000, "cpu")
    assert abs((cond["y"] == 4).float().mean().item() - 0.5) < 0.03
    assert torch.equal(clean["y"], torch.zeros(4000, dtype=torch.long))

    ctx_obj = DiffusionObjective(TinyDenoiser(), obj.diffusion, cond_key="text", cond_drop_prob=1.0,
                                 null_context=torch.zeros(3, 5))
    cond, _ = ctx_obj._condition({"text": torch.ones(2, 3, 5)}, 2, "cpu")
    assert torch.equal(cond["context"], torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="num_classes.*null_context"):
        DiffusionObjective(TinyDenoiser(), obj.diffusion, cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        obj._condition({"label": torch.tensor([7])}, 1, "cpu")


# ----------------------------------------------------------------------------------------------------------
# Training runs in this process


class GridObjective(DiffusionObjective):
    """Sample grid without a sampler: the one-step x0 prediction from pure noise at t = T-1."""

    def sample_images(self, models, num, generator):
        x = torch.randn(num, 1, 8, 8, generator=generator)
        t = torch.full((num,), self.diffusion.num_steps - 1)
        return self.diffusion.predict_x0(models["unet"](x, t, y=torch.arange(num) % 4), x, t).clamp(-1, 1)


def _fixed_loss(obj, data, T):
    """Loss on fixed (t, noise) pairs, so before/after training compare without sampling noise."""
    g = torch.Generator().manual_seed(123)
    x0 = data.images[:32]
    t = torch.arange(32) % T
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        out = obj.diffusion.training_losses(lambda x, tt, **c: obj.models["unet"](x, tt, **c), x0, t, noise,
                                            y=data.labels[:32])
    return out["loss"].mean().item()


def test_loss_falls_logs_lr_and_writes_samples(tmp_path):
    T = 50
    obj = make_objective(T=T, cond_drop_prob=0.1)
    obj.__class__ = GridObjective
    data = ToyImages(n=64)
    before = _fixed_loss(obj, data, T)
    cfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, log_every=1, checkpoint_every=20,
                      keep_checkpoints=1, sample_every=20, sample_num=4, ema_decay=0.9)
    result = train(obj, data, cfg, tmp_path, progress=False)
    after = _fixed_loss(obj, data, T)
    assert after < 0.75 * before, (before, after)
    assert isinstance(obj.models["unet"], TinyDenoiser)  # unwrapped modules handed back
    rows = _csv(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert [float(r["lr"]) for r in rows[:5]] == pytest.approx([7.5e-4, 1.5e-3, 2.25e-3, 3e-3, 3e-3])
    assert np.mean([float(r["loss"]) for r in rows[-10:]]) < np.mean([float(r["loss"]) for r in rows[:10]])
    # keep_checkpoints=1: only the final one; samples every 20 steps
    assert [s for s, _ in list_checkpoints(tmp_path)] == [40] and result.checkpoint.name == "step_0000040"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000040.png"))
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2) and (tmp_path / "samples" / "step_0000020.png").is_file()
    # the EMA is saved and differs from the trained weights
    ckpt = result.checkpoint
    w, e = load_file(ckpt / "models" / "unet.safetensors"), load_file(ckpt / "ema" / "unet.safetensors")
    assert torch.equal(w["out.weight"], obj.models["unet"].out.weight)
    assert not torch.equal(w["out.weight"], e["out.weight"])
    fresh = TinyDenoiser(num_classes=4, T=T)
    load_models(ckpt, {"unet": fresh}, ema=True)
    assert torch.equal(fresh.out.weight, e["out.weight"])


def test_truncated_checkpoint_is_reported_and_previous_used(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, keep_checkpoints=0, deterministic=True, log_every=1,
                      ema_decay=0.9)
    train(make_objective(T=10, dropout=0.1), ToyImages(n=24), cfg, tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "step_0000004"
    good = {f: _sha(last / f) for f in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers.pt")}
    weights = last / "models" / "unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncate
    with pytest.raises(CheckpointError, match=r"step_0000004/models/unet.safetensors is truncated"):
        verify_checkpoint(last)
    with pytest.warns(UserWarning, match="unet.safetensors"):
        assert latest_checkpoint(tmp_path).name == "step_0000002"
    # Resuming skips the broken one, redoes steps 3-4 from step 2 and lands on the same bits.
    with pytest.warns(UserWarning, match=r"skipping checkpoint step_0000004.*unet.safetensors"):
        result = train(make_objective(T=10, dropout=0.1), ToyImages(n=24), cfg, tmp_path, resume=True, progress=False)
    assert result.step == 4 and {f: _sha(last / f) for f in good} == good
    assert [int(r["step"]) for r in _csv(tmp_path / "metrics.csv")] == [1, 2, 3, 4]
    # A fresh run into a directory that holds a run is refused, and changes nothing there.
    before = {p: _sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="resume=True"):
        train(make_objective(T=10), ToyImages(n=24), cfg, tmp_path, progress=False)
    assert {p: _sha(p) for p in tmp_path.rglob("*") if p.is_file()} == before
    # Every checkpoint broken: a clear error, not a silent fresh start.
    for _, p in list_checkpoints(tmp_path):
        (p / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no complete checkpoint"), pytest.warns(UserWarning):
        find_resume_checkpoint(tmp_path)
    # Checkpoint .pt files are read with weights_only: a pickled object is refused.
    evil = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, evil)
    with pytest.raises(CheckpointError, match="evil.pt"):
        _torch_load(evil)


class NaNAt(DiffusionObjective):
    nan_step = 4

    def losses(self, batch, step):
        losses, logs = super().losses(batch, step)
        if step == self.nan_step:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, logs


def test_nan_loss_stops_without_touching_weights_or_checkpoints(tmp_path):
    obj = make_objective(T=10)
    obj.__class__ = NaNAt
    cfg = TrainConfig(steps=10, batch_size=8, checkpoint_every=2, log_every=1, ema_decay=0.9)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5.*nan.*step_0000004") as err:
        train(obj, ToyImages(n=24), cfg, tmp_path, progress=False)
    assert err.value.step == 5 and err.value.checkpoint.name == "step_0000004"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    saved = load_file(tmp_path / "checkpoints" / "step_0000004" / "models" / "unet.safetensors")
    for k, v in obj.models["unet"].state_dict().items():
        assert torch.equal(v, saved[k]), k  # the NaN step changed nothing


class TwoOptimizers:
    """Loss "a" depends on both models, loss "b" on model b only: b's gradient must come from loss "b" alone."""

    def __init__(self):
        self.models = {"a": nn.Linear(4, 1, bias=False), "b": nn.Linear(4, 1, bias=False)}
        self.optimizers = {"a": ["a"], "b": ["b"]}
        self.ema = []
        self.last = None

    def losses(self, batch, step):
        x = batch["x"]
        a, b = self.models["a"](x), self.models["b"](x)
        self.last = x
        return {"a": ((a * b) ** 2).mean(), "b": (b ** 2).mean()}, {"seen": float(x.shape[0])}


def test_two_optimizers_get_only_their_own_gradients_from_a_dataloader(tmp_path):
    obj = TwoOptimizers()
    w_a, w_b = (obj.models[n].weight.detach().clone().requires_grad_() for n in ("a", "b"))
    loader = DataLoader(Pairs(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=1, batch_size=8, grad_clip=0.0, ema_decay=0.0, log_every=1, checkpoint_every=0)
    train(obj, loader, cfg, tmp_path, progress=False)
    rows = _csv(tmp_path / "metrics.csv")
    assert {"loss_a", "loss_b", "lr_a", "lr_b", "grad_norm_a", "grad_norm_b", "seen"} <= set(rows[0])
    # The grads left after the single step are those of the initial weights on the batch seen.
    x = obj.last
    loss_a = ((x @ w_a.T) * (x @ w_b.T)).pow(2).mean()
    loss_b = (x @ w_b.T).pow(2).mean()
    (ga,) = torch.autograd.grad(loss_a, w_a, retain_graph=True)
    (gb_own,) = torch.autograd.grad(loss_b, w_b, retain_graph=True)
    (gb_both,) = torch.autograd.grad(loss_a + loss_b, w_b)
    torch.testing.assert_close(obj.models["a"].weight.grad, ga)
    torch.testing.assert_close(obj.models["b"].weight.grad, gb_own)
    assert (gb_both - gb_own).abs().max() > 1e-4  # loss "a" would have changed b's gradient
    assert len(list_checkpoints(tmp_path)) == 1


def test_bad_objective_is_rejected(tmp_path):
    obj = Regression()
    obj.optimizers = {"model": ["nope"]}
    with pytest.raises(ValueError, match="'nope'"):
        train(obj, Pairs(), TrainConfig(steps=1, batch_size=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(Regression(), Pairs(n=3), TrainConfig(steps=1, batch_size=4), tmp_path, progress=False)


def test_grad_accum_matches_one_big_batch(tmp_path):
    a = run_regression(tmp_path / "one")
    b = run_regression(tmp_path / "accum", grad_accum=4)
    for (k, v), w in zip(a.models["net"].state_dict().items(), b.models["net"].state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=1e-6, msg=k)


def test_rng_states_round_trip():
    import random

    from latentdiff.train.checkpoint import capture_rng_state, restore_rng_state

    random.random(), np.random.rand(), torch.rand(1)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


# ----------------------------------------------------------------------------------------------------------
# Grids


def test_save_grid(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0)])
    path = save_grid(imgs, tmp_path / "g.png", nrow=2, padding=1)
    a = np.asarray(Image.open(path))
    assert a.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert (a[1, 1] == 0).all() and (a[1, 7] == 128).all() and (a[6, 1] == 255).all()
    with pytest.raises(ValueError, match="NaN"):
        save_grid(torch.full((1, 1, 2, 2), float("nan")), tmp_path / "n.png")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        save_grid(torch.zeros(3, 4, 4), tmp_path / "n.png")


# ----------------------------------------------------------------------------------------------------------
# Subprocess runs


def _spawn(*args):
    """``python ARGS`` in its own process group, with tests/ on its path (for ``-m helpers.…``)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.Popen([PYTHON, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc, timeout=240):
    """Output of ``proc``; on timeout its whole process group is killed (no stray trainers left behind)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} timed out:\n{out}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_and_resume_is_bit_exact(tmp_path):
    script = ("-m", "helpers.train_resume_script")
    a = _spawn(*script, tmp_path / "A")  # uninterrupted, alongside the interrupted run
    # Killed while writing the checkpoint of step 12: steps 9-12 are lost, a half-written directory is left.
    b1 = _spawn(*script, tmp_path / "B", "--kill-in-checkpoint", "12")
    out_b1 = _finish(b1)
    assert b1.returncode == -signal.SIGKILL, out_b1
    assert [s for s, _ in list_checkpoints(tmp_path / "B")] == [4, 8]
    assert (tmp_path / "B" / "checkpoints" / ".tmp_step_0000012").is_dir()
    b2 = _spawn(*script, tmp_path / "B", "--resume")
    out_b2, out_a = _finish(b2), _finish(a)
    assert a.returncode == 0 and b2.returncode == 0, out_a + out_b2
    assert "step_0000008 at step 8" in out_b2  # resumed from the last complete checkpoint
    A, B = tmp_path / "A" / "checkpoints" / "step_0000014", tmp_path / "B" / "checkpoints" / "step_0000014"
    for f in ("models/unet.safetensors", "ema/unet.safetensors", "optimizers.pt", "objective.pt"):
        assert _sha(A / f) == _sha(B / f), f
    wa, wb = load_file(A / "models" / "unet.safetensors"), load_file(B / "models" / "unet.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r["loss"] for r in _csv(tmp_path / "A" / "metrics.csv")]
    assert la == [r["loss"] for r in _csv(tmp_path / "B" / "metrics.csv")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_match_one_process_with_double_batch(tmp_path):
    proc = _spawn("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "helpers.train_ddp_script", tmp_path / "ddp")
    single = run_regression(tmp_path / "single")  # meanwhile, one process with the whole batch of 8
    out = _finish(proc)
    assert proc.returncode == 0 and "ddp ok: world=2" in out, out
    ckpt = tmp_path / "ddp" / "regression" / "checkpoints" / "step_0000003"
    state = verify_checkpoint(ckpt)
    assert state["world_size"] == 2 and (ckpt / "rng" / "rank1.pt").is_file()
    init = Regression().models["net"].state_dict()
    for sub in ("models", "ema"):
        w = load_file(ckpt / sub / "net.safetensors")
        ref = single.models["net"].state_dict() if sub == "models" else \
            load_file(tmp_path / "single" / "checkpoints" / "step_0000003" / "ema" / "net.safetensors")
        for k in w:
            assert (ref[k] - init[k]).abs().max() > 1e-3  # the weights did move
            torch.testing.assert_close(w[k], ref[k], rtol=0, atol=1e-6, msg=f"{sub}/{k}")


def test_real_unet_trains_and_samples_a_grid(tmp_path):
    """The U-Net of nn/unet.py and the sampling entry point, through the loop (3 steps, one 4-image grid)."""
    import latentdiff.nn.unet as unet_mod  # the project's own modules: an ImportError is a failure, not a skip
    from latentdiff.diffusion import GaussianDiffusion
    from latentdiff.schedules import make_betas

    unet = unet_mod.unet_from_preset("tiny", num_classes=4)
    diffusion = GaussianDiffusion(make_betas("cosine", 20))
    obj = DiffusionObjective(unet, diffusion, num_classes=4, cond_drop_prob=0.5, sample_sampler="ddim", sample_steps=4)
    cfg = TrainConfig(steps=3, batch_size=8, sample_every=3, sample_num=4, checkpoint_every=0, ema_decay=0.9)
    result = train(obj, ToyImages(n=16), cfg, tmp_path, progress=False)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step_0000003.png"))
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2) and grid.std() > 0
    assert result.step == 3 and np.isfinite(result.metrics["loss"])
    fresh = unet_mod.unet_from_preset("tiny", num_classes=4)
    load_models(result.checkpoint, {"unet": fresh}, ema=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), unet.state_dict().values()))


def test_ddp_broadcasts_buffers_only_for_models_that_keep_state_in_them():
    """DDP's per-forward buffer broadcast is a collective every step: on for persistent buffers (BatchNorm's running
    statistics, a codebook's usage), off when the only buffers are constants (the U-Net's timestep frequencies);
    the fused AdamW takes CPU parameters."""
    from latentdiff.train.loop import _fusable, _make_accelerator

    class Constants(nn.Linear):
        def __init__(self):
            super().__init__(2, 2)
            self.register_buffer("freqs", torch.arange(3.0), persistent=False)

    config = TrainConfig(steps=1, batch_size=2)
    accelerator, _ = _make_accelerator(config, [Constants()])
    assert accelerator.ddp_handler.broadcast_buffers is False
    assert accelerator.ddp_handler.gradient_as_bucket_view is True
    accelerator, _ = _make_accelerator(config, [Constants(), nn.BatchNorm2d(4)])
    assert accelerator.ddp_handler.broadcast_buffers is True
    assert _fusable(list(Constants().parameters()))
    assert not _fusable([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
