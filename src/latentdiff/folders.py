"""Run folders, model folders and checkpoints on disk: their file names, what kind a folder is, the newest
complete checkpoint, and reading weights from them.

Four kinds of folder, told apart by :func:`folder_kind`::

    model             config.yaml (a resolved diffusion config) + model.safetensors    (`latentdiff export`)
                      + first_stage/ (an autoencoder model folder) for latent diffusion
    run               config.yaml + checkpoints/ (+ first_stage/ for latent diffusion) (`latentdiff train`)
    autoencoder       config.json (format "latentdiff-autoencoder", the latent scale) + model.safetensors
    autoencoder run   config.yaml with an ``autoencoder`` section + checkpoints/, and autoencoder/ (an
                      autoencoder model folder) once training has finished

A checkpoint is ``checkpoints/step_XXXXXXX/`` with ``models/<name>.safetensors`` (trained weights),
``ema/<name>.safetensors`` (EMA weights) and, written last, ``state.json``, whose ``files`` manifest lists the
size and sha256 of every other file: a checkpoint is complete when state.json exists and the files agree with
it. Writing checkpoints is the training loop's (train/checkpoint.py); this module only reads them.

Nothing here imports torch at module level: the command line answers ``--help`` without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

from .errors import CheckpointError, MissingFileError
from .fileio import read_json

CONFIG_FILE = "config.yaml"                 # the resolved config of a run or (diffusion) model folder
WEIGHTS_FILE = "model.safetensors"          # the network of a model folder (diffusion or autoencoder)
CONDITIONER_FILE = "conditioner.safetensors"  # the conditioner τ_θ of a diffusion model folder (text, class)
TOKENIZER_FILE = "tokenizer.json"           # the text conditioner's vocabulary (run and model folders)
MODEL_FILES = {"unet": WEIGHTS_FILE, "cond": CONDITIONER_FILE}  # network name in checkpoints -> model-folder file
AE_CONFIG_FILE = "config.json"              # an autoencoder model folder's config and latent scale
AE_FORMAT = "latentdiff-autoencoder"        # its "format" field
FIRST_STAGE_DIR = "first_stage"             # the autoencoder's copy inside a latent run or model folder
EXPORT_DIR = "autoencoder"                  # the model folder an autoencoder run writes at its end
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"                   # a checkpoint's state and file manifest, written last
LATEST_FILE = "latest"                      # names the newest complete checkpoint (a hint; verified on use)
SEAL_KEY = "latentdiff_data_sha256"         # safetensors metadata: sha256 of the file's tensor data
CONFIG_SEAL_KEY = "latentdiff_config_sha256"  # and of the config file saved beside it (model folders)
_UNSEALED = "0" * 64                        # its placeholder until seal_safetensors fills it in
MODELS_DIR, EMA_DIR = "models", "ema"       # a checkpoint's trained and EMA weights

MODEL, RUN, AUTOENCODER, AUTOENCODER_RUN = "model", "run", "autoencoder", "autoencoder run"


# ---------------------------------------------------------------------------------------------------------
# What a folder is


def is_autoencoder_config(data) -> bool:
    """Whether the sections of a config file (a mapping) describe an autoencoder run."""
    return isinstance(data, Mapping) and "autoencoder" in data


def is_autoencoder_folder(path) -> bool:
    """A model folder written by :func:`~latentdiff.nn.autoencoder.save_autoencoder`."""
    f = Path(path) / AE_CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == AE_FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def is_autoencoder_run(path) -> bool:
    """A run folder whose config.yaml has an ``autoencoder`` section (an unreadable one does not count: loading
    it as a config then names the problem)."""
    import yaml

    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return is_autoencoder_config(yaml.safe_load(f.read_text()))
    except (yaml.YAMLError, ValueError, OSError):
        return False


def is_autoencoder(path) -> bool:
    return is_autoencoder_folder(path) or is_autoencoder_run(path)


def folder_kind(path) -> str | None:
    """MODEL, RUN, AUTOENCODER or AUTOENCODER_RUN (see the module docstring), or None for anything else."""
    path = Path(path)
    if is_autoencoder_folder(path):
        return AUTOENCODER
    if not (path / CONFIG_FILE).is_file():
        return None
    if is_autoencoder_run(path):
        return AUTOENCODER_RUN
    return MODEL if (path / WEIGHTS_FILE).is_file() else RUN


def resolve_first_stage(path: str, base_dir=None) -> Path:
    """The autoencoder folder ``path`` names: relative to ``base_dir`` (a saved run or model folder) when it
    exists there, else as given (relative to the working directory)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return p


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: finding and verifying


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_name(step: int) -> str:
    return f"step_{int(step):07d}"


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


STATE_HASH = "state_sha256"  # state.json's own checksum: sha256 of its other fields as sorted, compact JSON


def state_hash(state: dict) -> str:
    """The checksum a state.json stores of itself (every field but ``state_sha256``)."""
    rest = {k: v for k, v in state.items() if k != STATE_HASH}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_state(path) -> dict:
    """A checkpoint's state.json (step, file manifest, ...), without checking the files it lists; its own
    checksum (when it has one: checkpoints since format 2) and its step are checked."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"incomplete checkpoint: {state_file} is missing")
    state = read_json(state_file, CheckpointError)
    if not isinstance(state.get("files"), dict) or "step" not in state:
        raise CheckpointError(f"corrupt checkpoint file {state_file}: no step or file manifest")
    if STATE_HASH in state and state[STATE_HASH] != state_hash(state):
        raise CheckpointError(f"corrupt checkpoint file {state_file}: its content differs from its {STATE_HASH}")
    name = Path(path).name
    if name.startswith("step_") and name[5:].isdigit() and state["step"] != int(name[5:]):
        raise CheckpointError(f"corrupt checkpoint file {state_file}: step {state['step']!r} in a folder {name}")
    return state


def check_file(path, rel: str, manifest: dict) -> Path:
    """``path / rel`` after checking its size and sha256 against the manifest of state.json."""
    f, info = Path(path) / rel, manifest.get(rel)
    if info is None or not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing")
    if not isinstance(info, dict) or not isinstance(info.get("size"), int) or not isinstance(info.get("sha256"), str):
        raise CheckpointError(f"corrupt checkpoint file {Path(path) / STATE_FILE}: bad manifest entry for {rel!r}")
    size = f.stat().st_size
    if size != info["size"]:
        raise CheckpointError(f"checkpoint file {f} is truncated or corrupt: {size} bytes, "
                              f"{STATE_FILE} lists {info['size']}")
    if sha256(f) != info["sha256"]:
        raise CheckpointError(f"checkpoint file {f} is corrupt: its sha256 differs from the one {STATE_FILE} lists")
    return f


# ---------------------------------------------------------------------------------------------------------
# Sealed weights: a safetensors file that carries the sha256 of its own tensor data


def seal_metadata(metadata: dict | None = None, config=None) -> dict:
    """The metadata to write a safetensors file with, before :func:`seal_safetensors` fills in the checksum;
    with the sha256 of the ``config`` file saved beside it, when given."""
    out = {**(metadata or {}), SEAL_KEY: _UNSEALED}
    if config is not None:
        out[CONFIG_SEAL_KEY] = sha256(Path(config))
    return out


def check_config_seal(weights, config) -> None:
    """Warn, naming ``config``, when it differs from the config file that ``weights`` was saved with (a hand
    edit, or corruption that still parses: its values are validated as it is read either way)."""
    try:
        with open(weights, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return  # the weights' own check reports this
    expected = meta.get(CONFIG_SEAL_KEY) if isinstance(meta, dict) else None
    if expected is not None and Path(config).is_file() and sha256(Path(config)) != expected:
        warnings.warn(f"{config} differs from the config {Path(weights).name} was saved with (edited by hand, or "
                      "corrupt); its values are checked as it is read", stacklevel=3)


def seal_safetensors(path) -> None:
    """Write the sha256 of the tensor data of ``path`` (written with :func:`seal_metadata`) into its header, and
    put the metadata keys in sorted order (the writer's order varies from process to process, which would make
    two identical runs differ in bytes). The metadata keeps its length: nothing else in the file moves."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n).decode("utf-8")
        key = '"__metadata__":'
        start = header.find(key) + len(key)
        if start < len(key):
            raise ValueError(f"{path} was not written with seal_metadata()")
        meta, end = json.JSONDecoder().raw_decode(header, start)
        if meta.get(SEAL_KEY) != _UNSEALED:
            raise ValueError(f"{path} was not written with seal_metadata()")
        meta[SEAL_KEY] = _data_sha256(f, 8 + n)
        text = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) != len(header[start:end].encode()):  # another writer's JSON style: keep its order
            text = header[start:end].replace(_UNSEALED, meta[SEAL_KEY])
        f.seek(8 + len(header[:start].encode()))
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def save_sealed_model(model, path, config=None) -> None:
    """Write the weights of ``model`` (an nn.Module) to the safetensors file ``path``, sealed (with the sha256
    of the ``config`` file beside it, when given)."""
    from safetensors.torch import save_model

    save_model(model, str(path), metadata=seal_metadata({"format": "pt"}, config))
    seal_safetensors(path)


def check_safetensors(path) -> None:
    """CheckpointError naming ``path`` when its header is unreadable or its tensor data differs from the sha256
    it was sealed with; files without a seal (older ones, other writers) pass unchecked."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            meta = json.loads(f.read(n)).get("__metadata__") or {}
            sealed = meta.get(SEAL_KEY) if isinstance(meta, dict) else None
            if sealed is None:
                return
            if _data_sha256(f, 8 + n) != sealed:
                raise ValueError("its tensor data differs from the sha256 it was written with")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"weights file {path} is truncated or corrupt: {e}") from None


def _data_sha256(f, offset: int) -> str:
    f.seek(offset)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path) -> dict:
    """Return the checkpoint's state.json after checking every file against its manifest.

    Raises CheckpointError naming the first missing, truncated or altered file.
    """
    state = read_state(path)
    for rel in state["files"]:
        check_file(path, rel, state["files"])
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
    pointer = checkpoint_root(out_dir) / LATEST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_bytes().decode().strip()
            if not (name.startswith("step_") and name[5:].isdigit()):
                raise CheckpointError(f"{pointer} does not name a step directory: {name[:40]!r}")
            path = checkpoint_root(out_dir) / name
            verify_checkpoint(path)
            return path
        except (CheckpointError, MissingFileError, UnicodeDecodeError) as e:
            warnings.warn(f"'latest' names no complete checkpoint ({e}); looking for the newest one", stacklevel=2)
    found = find_resume_checkpoint(out_dir)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------
# Weights


def weights_in_checkpoint(name: str, *, ema: bool) -> str:
    """Where a checkpoint keeps the weights of model ``name``, relative to it (as its manifest names them):
    ``ema/<name>.safetensors`` or ``models/<name>.safetensors``."""
    return str(Path(EMA_DIR if ema else MODELS_DIR) / f"{name}.safetensors")


def checkpoint_weights(run, name: str, *, ema: bool = True) -> Path:
    """The weights file of model ``name`` in the newest complete checkpoint of run folder ``run``: its EMA
    copy when there is one and ``ema``, else the trained weights.

    Complete means state.json exists and lists the file with its size and sha256, which are checked; only
    that file is hashed (not the optimizer state, as a resume must), so sampling from a big run starts fast.
    A broken newest checkpoint is reported with a warning and the one before it used.
    """
    run = Path(run)
    problems = []
    for _, ckpt in reversed(list_checkpoints(run)):
        try:
            files = read_state(ckpt)["files"]
            rel = weights_in_checkpoint(name, ema=True)
            if not (ema and rel in files):
                rel = weights_in_checkpoint(name, ema=False)
            f = check_file(ckpt, rel, files)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"using {ckpt.name}: " + "; ".join(problems), stacklevel=3)
        return f
    if problems:
        raise CheckpointError(f"no complete checkpoint in {run}: " + "; ".join(problems))
    raise MissingFileError(f"{run} has neither {WEIGHTS_FILE} nor a complete checkpoint under {CHECKPOINTS_DIR}/")


def model_weights(folder, name: str, *, ema: bool = True) -> Path:
    """The weights of network ``name`` in a model folder (its model.safetensors) or a run folder (the newest
    complete checkpoint, see :func:`checkpoint_weights`)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        return checkpoint_weights(folder, name, ema=ema)
    f = folder / MODEL_FILES.get(name, WEIGHTS_FILE)
    if not f.is_file():
        raise MissingFileError(f"model folder {folder} has no {f.name} (the weights of its {name!r} network)")
    return f


def load_model_weights(model, path) -> None:
    """Load a safetensors file into ``model`` (an nn.Module; strict); errors name the file."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {path} not found")
    check_safetensors(path)
    try:
        load_model(model, str(path), strict=True)
    except Exception as e:
        raise CheckpointError(f"cannot load weights {path} into {type(model).__name__}: {e}") from None
