"""Faults a run survives (issue 17, items 3 and 7): a checkpoint write that fails (no space, a read-only folder,
an injected OSError, a real file-size limit) stops the run with one line naming the checkpoint and keeps the one
before; two trainers in one run folder (the second is refused; a dead one leaves no stuck lock); SIGINT / SIGTERM
write a checkpoint of the current step and stop; a NaN or inf in the autoencoder's GAN losses stops the run with
the last good checkpoint kept."""

import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import latentdiff.train.checkpoint as ckpt
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig
from latentdiff.nn.discriminator import DiscriminatorConfig, PatchDiscriminator
from latentdiff.train import TrainConfig, TrainingDiverged, list_checkpoints, train, verify_checkpoint
from latentdiff.train.autoencoder_objective import AutoencoderObjective
from latentdiff.train.checkpoint import CheckpointWriteError
from latentdiff.train.guards import LOCK_FILE, RunFolderBusy, TrainingInterrupted

from helpers.clitools import run_cli
from helpers.train_tiny import ToyImages, make_objective

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = dict(steps=6, batch_size=8, lr=3e-3, checkpoint_every=2, keep_checkpoints=0, log_every=1, ema_decay=0.9,
              deterministic=True, seed=5)
CHECKED = ("models/unet.safetensors", "ema/unet.safetensors", "optimizers.pt", "rng/rank0.pt")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _train(out, *, resume=False, **overrides):
    cfg = TrainConfig(**{**CONFIG, **overrides})
    return train(make_objective(T=10, dropout=0.1), ToyImages(n=24), cfg, out, resume=resume, progress=False)


def _final(out, step=6) -> dict:
    d = Path(out) / "checkpoints" / f"step_{step:07d}"
    return {f: _sha(d / f) for f in CHECKED}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    _train(out)
    return _final(out)


# ----------------------------------------------------------------------------------------------------------
# Failed checkpoint writes


def _failing(exc, after: int = 0):
    """A checkpoint writer that raises ``exc`` at the checkpoint of step 4, after ``after`` files were written."""
    calls = {"n": 0}

    def wrap(real):
        def writer(obj, path):
            if "step_0000004" in str(path):
                calls["n"] += 1
                if calls["n"] > after:
                    raise exc(path)
            return real(obj, path)
        return writer

    return wrap


FAULTS = {
    "no space (safetensors)": ("_save_model", lambda p: OSError(errno.ENOSPC, "No space left on device", str(p)), 1),
    "read-only folder": ("_torch_save", lambda p: OSError(errno.EROFS, "Read-only file system", str(p)), 0),
    "torch.save failure": ("_torch_save", lambda p: RuntimeError("PytorchStreamWriter failed writing file data/0"), 1),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_checkpoint_write_names_the_path_keeps_the_previous_and_resumes(fault, uninterrupted, tmp_path,
                                                                                 monkeypatch):
    name, exc, after = FAULTS[fault]
    monkeypatch.setattr(ckpt, name, _failing(exc, after)(getattr(ckpt, name)))
    with pytest.raises(CheckpointWriteError) as err:
        _train(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "checkpoints/step_0000004" in msg and "step_0000002 is intact" in msg, msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    verify_checkpoint(tmp_path / "checkpoints" / "step_0000002")
    assert not list((tmp_path / "checkpoints").glob(".tmp_*")) and not (tmp_path / LOCK_FILE).exists()
    monkeypatch.undo()
    result = _train(tmp_path, resume=True)
    assert result.step == 6 and _final(tmp_path) == uninterrupted


def test_a_real_file_size_limit_gives_one_line_exit_2_and_the_run_resumes(tmp_path, capsys):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG): the command prints one line naming the checkpoint."""
    cfg = ROOT / "configs" / "tiny_test.yaml"
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [sys.executable, "-m", "latentdiff.cli", "train", str(cfg), "--out", str(out), "--quiet"]
    rc, _, err = run_cli(capsys, "train", cfg, "--out", out, "--quiet", "train.steps=2")  # in-process: no start-up
    assert rc == 0, err
    weights = out / "checkpoints" / "step_0000002" / "models" / "unet.safetensors"
    limit = weights.stat().st_size // 2  # metrics and configs fit, a checkpoint's weights do not

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run([*args, "--resume", "train.steps=4"], env=env, capture_output=True, text=True,
                            timeout=120, preexec_fn=small_files)
    err = failed.stderr.strip()
    assert failed.returncode == 2 and len(err.splitlines()) == 1, failed.stdout + failed.stderr
    assert "Traceback" not in err and f"cannot write checkpoint {out}/checkpoints/step_0000004" in err, err
    assert "step_0000002 is intact" in err
    assert [s for s, _ in list_checkpoints(out)] == [2] and not list((out / "checkpoints").glob(".tmp_*"))
    verify_checkpoint(out / "checkpoints" / "step_0000002")
    rc, stdout, err = run_cli(capsys, "train", cfg, "--out", out, "--quiet", "--resume", "train.steps=4")
    assert rc == 0 and "at step 2" in stdout, stdout + err
    verify_checkpoint(out / "checkpoints" / "step_0000004")


# ----------------------------------------------------------------------------------------------------------
# One trainer per run folder


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from latentdiff.train.guards import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_stuck_lock(tmp_path):
    _train(tmp_path, steps=2)
    before = {p: _sha(p) for p in tmp_path.rglob("*") if p.is_file() and p.name != "metrics.csv"}
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another training process \(pid {holder.pid} on .*"
                                                 "nothing was written"):
            _train(tmp_path, resume=True)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel drops it
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the dead holder's file is still there ...
    assert {p: _sha(p) for p in before} == before
    result = _train(tmp_path, resume=True)  # ... and does not block the next run
    assert result.step == 6 and not (tmp_path / LOCK_FILE).exists()


def test_a_refused_fresh_folder_is_not_left_behind(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy):
            _train(tmp_path / "run")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # only the holder's file
    with pytest.raises(ValueError, match="nothing/state.json is missing"):  # bad resume target: its new folder goes
        _train(tmp_path / "fresh", resume=tmp_path / "nothing")
    assert not (tmp_path / "fresh").exists()


# ----------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["after step 3", "during the checkpoint of step 4"])
def test_a_signal_writes_a_checkpoint_of_the_current_step_then_stops(signum, moment, uninterrupted, tmp_path,
                                                                     monkeypatch):
    writes = []
    real = ckpt.save_checkpoint
    before = signal.getsignal(signum)  # the default, or SIG_IGN in a job started in the background of a shell

    def counting(out_dir, step, **kw):
        writes.append(step)
        if moment.startswith("during") and step == 4:
            os.kill(os.getpid(), signum)  # arrives while the checkpoint is being written
        return real(out_dir, step, **kw)

    monkeypatch.setattr("latentdiff.train.loop.save_checkpoint", counting)

    def callback(step, metrics):
        if moment.startswith("after") and step == 3:
            os.kill(os.getpid(), signum)

    cfg = TrainConfig(**CONFIG)
    with pytest.raises(TrainingInterrupted) as err:
        train(make_objective(T=10, dropout=0.1), ToyImages(n=24), cfg, tmp_path, progress=False, callback=callback)
    stop = 3 if moment.startswith("after") else 4
    assert err.value.step == stop and err.value.signum == signum and err.value.checkpoint.name == f"step_{stop:07d}"
    assert writes == [2, stop]  # one checkpoint of the stopping step, not a second one
    verify_checkpoint(err.value.checkpoint)
    assert signal.getsignal(signum) == before  # the handler in place before the run is restored
    monkeypatch.undo()
    result = _train(tmp_path, resume=True)
    assert result.step == 6 and _final(tmp_path) == uninterrupted


def test_a_second_signal_stops_at_once(tmp_path):
    def callback(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the first asks for a checkpoint at the end of the step ...
            os.kill(os.getpid(), signal.SIGINT)   # ... the second does not wait for it

    with pytest.raises(KeyboardInterrupt) as err:
        train(make_objective(T=10, dropout=0.1), ToyImages(n=24), TrainConfig(**CONFIG), tmp_path, progress=False,
              callback=callback)
    assert not isinstance(err.value, TrainingInterrupted)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and not (tmp_path / LOCK_FILE).exists()


def test_sigterm_to_the_command_checkpoints_and_exits(tmp_path):
    cfg = ROOT / "configs" / "tiny_test.yaml"
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "train", str(cfg), "--out", str(out), "--quiet",
                             "train.steps=100000", "train.checkpoint_every=0", "train.log_every=1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.csv").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted (continue with --resume)" in stderr, stdout + stderr
    (step, path), = list_checkpoints(out)
    assert step > 0 and f"stopped by SIGTERM at step {step}" in stdout
    verify_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------
# NaN / inf in the GAN losses of the autoencoder


class Pictures(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i]}


@pytest.mark.parametrize("where,value", [("g_loss", float("nan")), ("d_loss", float("inf")),
                                         ("d_loss", float("nan"))])
def test_a_non_finite_gan_loss_stops_with_the_last_good_checkpoint(where, value, tmp_path):
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=8))
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, n_layers=1, norm="group"))
    objective = AutoencoderObjective(ae, discriminator=disc, config={"disc_start": 1, "rec_loss": "l2"})
    state = {"step": None}

    class Poisoning(AutoencoderObjective):
        def losses(self, batch, step):
            state["step"] = step
            return super().losses(batch, step)

    objective.__class__ = Poisoning

    def poison(module, inputs, output):
        generator_pass = inputs[0].requires_grad
        if state["step"] == 4 and generator_pass == (where == "g_loss"):
            return output * value if value != value else output + value
        return output

    disc.register_forward_hook(poison)
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1, ema_decay=0.0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5.*step_0000004") as err:
        train(objective, Pictures(), cfg, tmp_path, progress=False)
    loss_name = "autoencoder" if where == "g_loss" else "discriminator"
    assert f"{loss_name}={value}" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    for name, model in (("autoencoder", ae), ("discriminator", disc)):
        saved = load_file(tmp_path / "checkpoints" / "step_0000004" / "models" / f"{name}.safetensors")
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), (name, k)  # the bad step changed no weight
