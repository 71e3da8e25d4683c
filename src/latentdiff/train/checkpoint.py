"""Checkpoints that survive a kill at any moment and resume a run exactly.

Layout of ``out_dir/checkpoints/``::

    step_0001000/
        state.json                step, data position, EMA counters, config, and a manifest (size + sha256)
                                  of every other file; written last, so its presence marks a complete write
        models/<name>.safetensors trained weights (unwrapped)
        ema/<name>.safetensors    EMA weights
        optimizers.pt             per optimizer: AdamW and lr-scheduler state dicts
        objective.pt              objective.state_dict() (e.g. the timestep resampler), if it has one
        rng/rank<r>.pt            torch / CUDA / numpy / python RNG states and loader generators of process r
    latest                        text file naming the newest complete step directory

A checkpoint is written into ``.tmp_step_XXXXXXX``, every file fsynced, then renamed to its final name in one
``os.replace`` and only then named in ``latest`` (also replaced atomically). The ``.pt`` files hold tensors
and plain containers only and are read with ``torch.load(weights_only=True)``: no pickled code is ever run.
Finding, verifying and reading checkpoints (for a resume or for inference) is latentdiff.folders'; the names
are re-exported here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from ..errors import CheckpointError
from ..folders import (  # noqa: F401  (finding, verifying and reading checkpoints: re-exported from here)
    LATEST_FILE,
    STATE_FILE,
    STATE_HASH,
    checkpoint_root,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    sha256,
    state_hash,
    step_name,
    verify_checkpoint,
    weights_in_checkpoint,
)

FORMAT = 2  # 2: state.json holds its own checksum (format 1 checkpoints still load)


# ---------------------------------------------------------------------------------------------------------
# Small atomic file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    _fsync_file(path)


def _save_model(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))  # handles tied weights; a plain state dict on disk
    _fsync_file(path)


# ---------------------------------------------------------------------------------------------------------
# RNG states as tensors and plain values (loadable with weights_only=True)


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    out_dir,
    step: int,
    *,
    models: dict,                 # name -> unwrapped nn.Module
    ema: dict,                    # name -> EMA
    optimizers: dict,             # name -> (optimizer, lr scheduler)
    objective_state: dict | None, # objective.state_dict() or None
    train_state: dict,            # JSON-able: data position, config, ... (stored in state.json)
    rng_state: dict,              # capture_rng_state() of this process (+ loader generators)
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    keep: int = 0,
) -> Path:
    """Write the checkpoint of ``step`` atomically; every process calls this (each writes its RNG file).

    A failed write (no space, a read-only folder, any OSError of the writers) raises CheckpointWriteError naming
    the checkpoint; its temporary directory is removed and the checkpoints written before stay as they were."""
    root = checkpoint_root(out_dir)
    tmp, final = root / f".tmp_{step_name(step)}", root / step_name(step)
    try:
        _write_checkpoint(root, step, tmp, final, models=models, ema=ema, optimizers=optimizers,
                          objective_state=objective_state, train_state=train_state, rng_state=rng_state, rank=rank,
                          is_main=is_main, barrier=barrier, keep=keep, out_dir=out_dir)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap the OSError
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for _, p in list_checkpoints(out_dir) if p != final]
        reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else \
            " ".join(str(e).split())
        raise CheckpointWriteError(
            f"cannot write checkpoint {final} ({reason}); the previous checkpoint "
            f"{previous[-1] if previous else '(none)'} is intact: free space or fix the folder, then --resume"
        ) from None
    return final


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, read-only folder, I/O error); earlier ones are intact."""


def _write_checkpoint(root: Path, step: int, tmp: Path, final: Path, *, models, ema, optimizers, objective_state,
                      train_state, rng_state, rank, is_main, barrier, keep, out_dir) -> None:
    name = final.name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a process killed while writing
        tmp.mkdir()
    barrier()
    _torch_save(rng_state, tmp / "rng" / f"rank{rank}.pt")
    if is_main:
        for n, m in models.items():
            _save_model(m, tmp / weights_in_checkpoint(n, ema=False))
        for n, e in ema.items():
            _save_model(e.model, tmp / weights_in_checkpoint(n, ema=True))
        _torch_save({n: {"optimizer": o.state_dict(), "scheduler": s.state_dict()} for n, (o, s) in optimizers.items()},
                    tmp / "optimizers.pt")
        if objective_state is not None:
            _torch_save(objective_state, tmp / "objective.pt")
    barrier()
    if is_main:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
        state = dict(train_state, format=FORMAT, step=int(step), time=time.time(),
                     ema_updates={n: e.num_updates for n, e in ema.items()}, files=manifest)
        state[STATE_HASH] = state_hash(state)  # a flipped byte in state.json is then found, not trusted
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
        if final.exists():  # a complete checkpoint of the same step from an earlier attempt: replace it
            _remove_tree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST_FILE, name + "\n")
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                _remove_tree(old)
    barrier()


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint directory; renamed first so a half-deleted one never looks like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Reading


def _torch_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, a forbidden global ...
        raise CheckpointError(f"cannot read checkpoint file {path}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    """torch.load's error in one line: for a pickle that asks for code, the refused global (nothing was run)."""
    text = str(e)
    if "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in lines[1:] if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        return f"it holds more than tensors and plain data, refused without running it ({why})"
    return " ".join(text.split())


def load_models(path, models: dict, *, ema: bool = False) -> None:
    """Load a checkpoint's weights into ``models`` (name -> nn.Module); ``ema=True`` reads the EMA weights
    (falling back to the trained ones for models without an EMA). For inference from a checkpoint."""
    path = Path(path)
    for name, model in models.items():
        f = path / weights_in_checkpoint(name, ema=True)
        if not (ema and f.is_file()):
            f = path / weights_in_checkpoint(name, ema=False)
        load_model_weights(model, f)


def load_training_state(path, *, models: dict, ema: dict, optimizers: dict, objective=None, rank: int = 0,
                        world_size: int = 1) -> dict:
    """Load everything a resumed run needs into the given objects; returns state.json plus ``rng`` (this
    process's RNG states, or None when the checkpoint was written by a different number of processes)."""
    path = Path(path)
    state = verify_checkpoint(path)
    for n, m in models.items():
        load_model_weights(m, path / weights_in_checkpoint(n, ema=False))
    for n, e in ema.items():
        f = path / weights_in_checkpoint(n, ema=True)
        if f.is_file():
            load_model_weights(e.model, f)
            e.num_updates = int(state.get("ema_updates", {}).get(n, 0))
        else:
            warnings.warn(f"checkpoint {path.name} has no EMA weights for {n!r}; the EMA restarts from the model",
                          stacklevel=2)
            e.model.load_state_dict(models[n].state_dict())
    saved = _torch_load(path / "optimizers.pt")
    for n, (opt, sched) in optimizers.items():
        if n not in saved:
            raise CheckpointError(f"checkpoint file {path / 'optimizers.pt'} has no state for optimizer {n!r}")
        opt.load_state_dict(saved[n]["optimizer"])
        sched.load_state_dict(saved[n]["scheduler"])
    if objective is not None and hasattr(objective, "load_state_dict") and (path / "objective.pt").is_file():
        objective.load_state_dict(_torch_load(path / "objective.pt"))
    rng_file = path / "rng" / f"rank{rank}.pt"
    if state.get("world_size", 1) == world_size and rng_file.is_file():
        state["rng"] = _torch_load(rng_file)
    else:
        warnings.warn(f"checkpoint {path.name} was written by {state.get('world_size')} process(es), this run has "
                      f"{world_size}: random states restart from the seed, so the run will not repeat exactly",
                      stacklevel=2)
        state["rng"] = None
    return state
