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
"""

from __future__ import annotations

import hashlib
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
from safetensors.torch import load_model, save_model

FORMAT = 1
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{int(step):07d}"


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
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
    """Write the checkpoint of ``step`` atomically; every process calls this (each writes its RNG file)."""
    root = checkpoint_root(out_dir)
    name = step_name(step)
    tmp, final = root / f".tmp_{name}", root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a process killed while writing
        tmp.mkdir()
    barrier()
    _torch_save(rng_state, tmp / "rng" / f"rank{rank}.pt")
    if is_main:
        for n, m in models.items():
            _save_model(m, tmp / "models" / f"{n}.safetensors")
        for n, e in ema.items():
            _save_model(e.model, tmp / "ema" / f"{n}.safetensors")
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
        write_text_atomic(root / "latest", name + "\n")
        if keep > 0:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                _remove_tree(old)
    barrier()
    return final


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint directory; renamed first so a half-deleted one never looks like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Finding and verifying


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """(step, path) of every step directory, oldest first; temporary and trash directories are ignored."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def verify_checkpoint(path) -> dict:
    """Return the checkpoint's state.json after checking every file against its manifest.

    Raises CheckpointError naming the first missing, truncated or altered file.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"incomplete checkpoint: {state_file} is missing")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint file {state_file}: {e}") from None
    if not isinstance(state, dict) or "files" not in state or "step" not in state:
        raise CheckpointError(f"corrupt checkpoint file {state_file}: no step or file manifest")
    for rel, info in state["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or altered: {size} bytes, expected {info['size']}")
        if sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 does not match the manifest")
    return state


def find_resume_checkpoint(out_dir) -> tuple[Path, dict] | None:
    """The newest complete checkpoint (path, state) under ``out_dir``, or None if there is none at all.

    Broken ones are reported with a warning naming the file and skipped; if checkpoints exist but none is
    complete, CheckpointError lists what is wrong with each.
    """
    problems = []
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=2)
            problems.append(str(e))
    if problems:
        raise CheckpointError("no complete checkpoint to resume from: " + "; ".join(problems))
    return None


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint named by ``latest`` if complete, else the newest complete one; None if none exists."""
    pointer = checkpoint_root(out_dir) / "latest"
    if pointer.is_file():
        path = checkpoint_root(out_dir) / pointer.read_text().strip()
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"'latest' names a broken checkpoint ({e}); looking for an older one", stacklevel=2)
    found = find_resume_checkpoint(out_dir)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------
# Reading


def _torch_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, a forbidden global ...
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None


def load_model_weights(model: torch.nn.Module, path) -> None:
    """Load a safetensors file into ``model`` (strict); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        load_model(model, str(path), strict=True)
    except Exception as e:
        raise CheckpointError(f"cannot load weights {path} into {type(model).__name__}: {e}") from None


def load_models(path, models: dict, *, ema: bool = False) -> None:
    """Load a checkpoint's weights into ``models`` (name -> nn.Module); ``ema=True`` reads the EMA weights
    (falling back to the trained ones for models without an EMA). For inference from a checkpoint."""
    path = Path(path)
    for name, model in models.items():
        f = path / "ema" / f"{name}.safetensors"
        if not (ema and f.is_file()):
            f = path / "models" / f"{name}.safetensors"
        load_model_weights(model, f)


def load_training_state(path, *, models: dict, ema: dict, optimizers: dict, objective=None, rank: int = 0, world_size: int = 1) -> dict:
    """Load everything a resumed run needs into the given objects; returns state.json plus ``rng`` (this
    process's RNG states, or None when the checkpoint was written by a different number of processes)."""
    path = Path(path)
    state = verify_checkpoint(path)
    for n, m in models.items():
        load_model_weights(m, path / "models" / f"{n}.safetensors")
    for n, e in ema.items():
        f = path / "ema" / f"{n}.safetensors"
        if f.is_file():
            load_model_weights(e.model, f)
            e.num_updates = int(state.get("ema_updates", {}).get(n, 0))
        else:
            warnings.warn(f"checkpoint {path.name} has no EMA weights for {n!r}; the EMA restarts from the model", stacklevel=2)
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
                      f"{world_size}: random states restart from the seed, so the run will not repeat exactly", stacklevel=2)
        state["rng"] = None
    return state
