"""A latent cache: the frozen first stage encodes a dataset once, and diffusion training reads the latents.

Latent diffusion (Rombach et al. 2022, sec. 3.2) trains ε_θ on z = ℰ(x) with the autoencoder frozen, so the
encoding of a fixed image never changes; running ℰ on every training step repeats the same work. The cache
stores ℰ(x) of every item once, keyed by everything its content depends on:

- ``identity``: the dataset, as the caller names it (a JSON-able dict: its data settings, length, split, seed);
- ``autoencoder``: a sha256 of the autoencoder's config and state_dict tensors (names, dtypes, shapes, bytes),
  so it depends on the weights, never on the file they came from (:func:`autoencoder_hash`);
- ``mode``: ``"mean"`` or ``"sample"`` (below); ``count`` (items cached, after ``pool``), ``image_key`` and
  the ``fields`` kept.

A later run with the same key reuses the cache; a changed key (other data, retrained weights) builds a new
one in its own folder (old ones are left for the runs that still use them).

Modes, for a KL first stage with posterior q(z|x) = N(μ, diag σ²):

- ``"mean"`` stores μ; every access returns μ (the posterior mode).
- ``"sample"`` stores μ and σ; every access draws a fresh z = μ + σ·ε, ε ~ N(0, I) (the reparameterisation of
  Kingma & Welling 2014, eq. 10), as LDM samples the posterior each time it sees an image.

A VQ first stage has no posterior: the cache holds what ``Autoencoder.encode`` returns, the pre-quantisation
latent (decode quantises it), which is what the uncached path trains on too; its mode is recorded as "mean".

The latent scale s is not applied: the cache holds unscaled ℰ(x), and the diffusion model sees s·ℰ(x), so
multiply at use. A new scale (``latent.scale``, or a recomputed one) therefore leaves the cache valid.

On disk, ``<root>/<key hash>/``:

- ``latents.safetensors``: ``mean`` (N, C, h, w) float32, ``std`` (N, C, h, w) in sample mode, and
  ``field.<name>`` (N, ...) for each tensor field of the items (labels as tensors, cells, boxes, ...);
- ``meta.json``: the key in clear, count, latent shape, the sha256 of the safetensors file, and the JSON-able
  fields of the items (captions, int labels, paths, ...), one list of N values per field.

Writes are atomic: the folder is written under a temporary name in ``root`` and renamed into place, so a
reader sees a complete cache or none. A folder that fails any check (unreadable or missing file, checksum,
key, shapes, non-finite values) is replaced with a warning, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..folders import sha256

FORMAT, VERSION = "latentdiff-latent-cache", 1
LATENTS_FILE, META_FILE = "latents.safetensors", "meta.json"
MODES = ("mean", "sample")
_FIELD = "field."  # prefix of the tensor fields in the safetensors file


class CorruptCache(ValueError):
    """A cache folder that must not be used (and is rebuilt)."""


# ---------------------------------------------------------------------------------------------------------
# Keys


def _canonical(obj, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"latent cache: the {what} must be JSON-able (dicts, lists, str, numbers, bool, None): "
                        f"{e}") from None


def autoencoder_hash(autoencoder) -> str:
    """sha256 (hex) of the autoencoder's config and of its state_dict tensors in sorted key order: name, dtype,
    shape and raw bytes of each. Equal weights give equal hashes wherever they were loaded from."""
    model = getattr(autoencoder, "module", autoencoder)
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        h.update(_canonical(config.to_dict(), "autoencoder config").encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(identity: dict, autoencoder, *, mode: str, count: int, image_key: str = "image",
              fields: Sequence[str] | None = None) -> dict:
    """The key a cache is stored under (a JSON-able dict; its hash names the folder)."""
    if not isinstance(identity, dict):
        raise TypeError(f"latent cache: identity must be a dict naming the dataset, got {type(identity).__name__}")
    _canonical(identity, "dataset identity")
    if mode not in MODES:
        raise ValueError(f"latent cache: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if fields is not None and (isinstance(fields, str) or not all(isinstance(f, str) for f in fields)):
        raise TypeError(f"latent cache: fields must be a list of item keys, got {fields!r}")
    model = getattr(autoencoder, "module", autoencoder)
    if model.config.regularizer != "kl":
        mode = "mean"  # VQ: a deterministic latent, no posterior to sample
    return {"format": FORMAT, "version": VERSION, "identity": identity, "autoencoder": autoencoder_hash(model),
            "mode": mode, "count": int(count), "image_key": image_key,
            "fields": None if fields is None else sorted(fields)}


def key_hash(key: dict) -> str:
    return hashlib.sha256(_canonical(key, "cache key").encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------
# The dataset of cached latents


class LatentDataset(Dataset):
    """Cached latents as a map-style dataset: item i -> ``{"latent": (C, h, w) float32, **fields of item i}``.

    ``latent`` is unscaled ℰ(x): μ in mean mode, a fresh z = μ + σ·ε per access in sample mode. ε comes from
    ``self.generator`` (a CPU torch.Generator seeded with ``seed``), whose state the training loop can save
    and restore (``generator.get_state()`` / ``set_state``) to resume the draws exactly. In a DataLoader worker
    the worker's copy is reseeded once from the worker's seed, so workers never repeat each other's draws.
    :meth:`get` takes an explicit generator instead.

    Args:
        mean: (N, C, h, w) posterior means (or VQ latents).
        std: (N, C, h, w) posterior standard deviations (sample mode), or None (mean mode).
        tensor_fields: name -> (N, ...) tensor; row i belongs to item i.
        json_fields: name -> list of N JSON values.
        seed: seed of ``generator``.
        key, folder: the cache key and folder it was read from or written to (None when built in memory).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None, *, tensor_fields: dict | None = None,
                 json_fields: dict | None = None, seed: int = 0, key: dict | None = None, folder: Path | None = None):
        self.mean, self.std = mean, std
        self.tensor_fields, self.json_fields = dict(tensor_fields or {}), dict(json_fields or {})
        self.key, self.folder = key, folder
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._worker_seed: int | None = None

    @property
    def mode(self) -> str:
        return "mean" if self.std is None else "sample"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape[1:])

    @property
    def fields(self) -> list[str]:
        return sorted([*self.tensor_fields, *self.json_fields])

    def __len__(self) -> int:
        return self.mean.shape[0]

    def _generator(self) -> torch.Generator:
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            mixed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, info.seed])  # worker seed: base + worker id
            self.generator.manual_seed(int(mixed.generate_state(1, np.uint64)[0] >> 1))
        return self.generator

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, *, generator: torch.Generator | None = None) -> dict:
        """Item ``index``; in sample mode ε is drawn from ``generator`` (default: ``self.generator``)."""
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"latent cache: index {index} out of range for {n} cached items")
        index %= n
        z = self.mean[index]
        if self.std is not None:
            eps = torch.randn(z.shape, generator=generator or self._generator(), dtype=z.dtype)
            z = z + self.std[index] * eps  # z = μ + σ·ε
        return {"latent": z, **self.fields_of(index)}

    def fields_of(self, index: int) -> dict:
        """The stored condition fields (captions, labels, ...) of item ``index``."""
        item = {name: t[index] for name, t in self.tensor_fields.items()}
        item.update((name, values[index]) for name, values in self.json_fields.items())
        return item


class LatentMoments(Dataset):
    """The cached posterior moments as a dataset: item i -> ``{"latent_mean", "latent_std" (sample mode), **fields}``.

    For training: the objective draws z = μ + σ·ε itself, from the global RNG that checkpoints save, so a resumed
    run repeats the draws exactly (``train.objective.DiffusionObjective`` with ``latent_scale``).
    """

    def __init__(self, cache: LatentDataset):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        c, index = self.cache, int(index)
        item = {"latent_mean": c.mean[index]}
        if c.std is not None:
            item["latent_std"] = c.std[index]
        return {**item, **c.fields_of(index)}


# ---------------------------------------------------------------------------------------------------------
# Building


def _field_kind(value):
    """("tensor", tensor) / ("json", value) / (None, None) for a field value of an item."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if torch.is_tensor(value):
        return "tensor", value.detach().cpu()
    if isinstance(value, np.generic):
        value = value.item()
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return None, None
    return "json", value


class _Fields:
    """The non-image fields of the items, collected per name; each must keep its kind (and a tensor its shape
    and dtype) over all items. ``wanted`` None keeps every tensor or JSON-able field (others: a warning)."""

    def __init__(self, wanted: Sequence[str] | None, image_key: str):
        if wanted is not None and image_key in wanted:
            raise ValueError(f"latent cache: fields must not name the image key {image_key!r}")
        self.wanted, self.image_key = wanted, image_key
        self.kinds: dict[str, str] = {}
        self.tensors: dict[str, list] = {}
        self.values: dict[str, list] = {}
        self.first: int | None = None  # index of the first item seen, which fixes the fields

    def _first(self, item: dict) -> None:
        skipped = []
        for name in ([k for k in item if k != self.image_key] if self.wanted is None else self.wanted):
            if name not in item:
                raise KeyError(f"latent cache: field {name!r} is not in the dataset's items (keys: {sorted(item)})")
            kind, _ = _field_kind(item[name])
            if kind is None and self.wanted is not None:
                raise TypeError(f"latent cache: field {name!r} is a {type(item[name]).__name__}, neither a tensor "
                                "nor JSON-able; it cannot be cached")
            if kind is None:
                skipped.append(name)
                continue
            self.kinds[name] = kind
            (self.tensors if kind == "tensor" else self.values)[name] = []
        if skipped:
            warnings.warn(f"latent cache: fields {skipped} are neither tensors nor JSON-able; not cached", stacklevel=4)

    def add(self, i: int, item: dict) -> None:
        if self.first is None:
            self.first = i
            self._first(item)
        for name, kind in self.kinds.items():
            if name not in item:
                raise KeyError(f"latent cache: item {i} has no field {name!r}, which item {self.first} has")
            got, v = _field_kind(item[name])
            if got != kind:
                raise TypeError(f"latent cache: field {name!r} of item {i} is a {type(item[name]).__name__}; "
                                f"item {self.first}'s is a {kind} value")
            if kind == "json":
                self.values[name].append(v)
                continue
            seen = self.tensors[name]
            if seen and (v.shape, v.dtype) != (seen[0].shape, seen[0].dtype):
                raise ValueError(f"latent cache: field {name!r} of item {i} is {tuple(v.shape)} {v.dtype}, item "
                                 f"{self.first}'s {tuple(seen[0].shape)} {seen[0].dtype}; leave it out with "
                                 "fields=[...]")
            seen.append(v)

    def stacked(self) -> tuple[dict, dict]:
        return {k: torch.stack(v) for k, v in self.tensors.items()}, self.values


def _images(dataset, indices: range, image_key: str, fields: _Fields) -> torch.Tensor:
    """(B, C, H, W) images of ``indices``; their other fields go to ``fields``."""
    images = []
    for i in indices:
        item = dataset[i]
        if not isinstance(item, dict) or image_key not in item:
            got = f"keys {sorted(item)}" if isinstance(item, dict) else f"a {type(item).__name__}"
            raise ValueError(f"latent cache: item {i} of the dataset has no {image_key!r} ({got})")
        x = item[image_key]
        if not torch.is_tensor(x) or x.ndim != 3 or (images and x.shape != images[0].shape):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            want = f"{tuple(images[0].shape)} like item {indices[0]}" if images else "a (C, H, W) tensor"
            raise ValueError(f"latent cache: item {i}'s {image_key!r} is {shape}; expected {want}")
        images.append(x)
        fields.add(i, item)
    return torch.stack(images)


@torch.no_grad()
def encode_dataset(dataset, autoencoder, *, count: int, mode: str = "sample", image_key: str = "image",
                   fields: Sequence[str] | None = None, batch_size: int = 64, device=None, progress: bool = False):
    """Encode items 0..count-1 of ``dataset``: returns (mean, std or None, tensor_fields, json_fields).

    ``fields`` names the item keys to keep besides the image (None: every tensor or JSON-able one; others are
    skipped with a warning). A tensor field must have one shape and dtype in all items. ``std`` is returned in
    sample mode of a KL autoencoder only."""
    model = getattr(autoencoder, "module", autoencoder)
    kl = model.config.regularizer == "kl"
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    was_training, old_device = model.training, param.device
    collected = _Fields(fields, image_key)
    means, stds = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="latent cache", dynamic_ncols=True)
    model.eval().to(device)
    try:
        for start in range(0, count, batch_size):
            x = _images(dataset, range(start, min(count, start + batch_size)), image_key, collected)
            x = x.to(device=device, dtype=param.dtype)
            if kl:
                post = model.posterior(x)  # q(z|x) = N(μ, diag σ²)
                means.append(post.mean.float().cpu())
                if mode == "sample":
                    stds.append(post.std.float().cpu())
            else:
                means.append(model.encode(x).float().cpu())  # VQ: the pre-quantisation latent
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        model.train(was_training).to(old_device)
        if bar is not None:
            bar.close()
    mean = torch.cat(means)
    std = torch.cat(stds) if stds else None
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"latent cache: the autoencoder gave non-finite {name} values; is it trained and loaded?")
    return (mean, std, *collected.stacked())


def _write(folder: Path, key: dict, ds: LatentDataset) -> None:
    """Write the cache into a temporary folder beside ``folder`` and rename it into place (atomic)."""
    from safetensors.torch import save_file

    tensors = {"mean": ds.mean.contiguous()}
    if ds.std is not None:
        tensors["std"] = ds.std.contiguous()
    tensors.update({_FIELD + k: v.contiguous() for k, v in ds.tensor_fields.items()})
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    trash = None
    try:
        save_file(tensors, str(tmp / LATENTS_FILE), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": VERSION, "key": key, "count": len(ds),
                "latent_shape": list(ds.latent_shape), "mode": ds.mode, "sha256": sha256(tmp / LATENTS_FILE),
                "tensor_fields": sorted(ds.tensor_fields), "json_fields": ds.json_fields, "latent_scale_applied": False}
        (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if folder.exists():  # an unusable cache (we only build when loading failed): move it aside first
            trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(folder, trash)
            except FileNotFoundError:
                trash = None
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process installed the same key first; its cache holds the same latents: keep it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _load(folder: Path, key: dict, seed: int) -> LatentDataset:
    """Read and check a cache folder; :class:`CorruptCache` (with the reason) when it must not be used."""
    from safetensors.torch import load

    meta_path, data_path = folder / META_FILE, folder / LATENTS_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCache(f"{meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCache(f"{meta_path} is not a latent cache description")
    if _canonical(meta.get("key"), "stored key") != _canonical(key, "cache key"):
        raise CorruptCache(f"{meta_path} holds another key")
    try:
        raw = data_path.read_bytes()
    except OSError as e:
        raise CorruptCache(f"{data_path}: {e}") from None
    if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        raise CorruptCache(f"{data_path} does not match its checksum in {META_FILE}")
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise CorruptCache(f"{data_path}: {e}") from None
    n, mode = meta.get("count"), key["mode"]
    shape = (n, *meta.get("latent_shape", []))
    mean, std = tensors.get("mean"), tensors.get("std")
    if mean is None or tuple(mean.shape) != shape or (mode == "sample") != (std is not None):
        want = " and 'std'" if mode == "sample" else " and no 'std'"
        raise CorruptCache(f"{data_path}: expected 'mean' of shape {shape}{want}")
    if std is not None and (tuple(std.shape) != shape or not (std > 0).all()):
        raise CorruptCache(f"{data_path}: 'std' must be positive, of shape {shape}")
    if not torch.isfinite(mean).all() or (std is not None and not torch.isfinite(std).all()):
        raise CorruptCache(f"{data_path}: non-finite latents")
    tensor_fields = {k[len(_FIELD):]: v for k, v in tensors.items() if k.startswith(_FIELD)}
    json_fields = meta.get("json_fields")
    if sorted(tensor_fields) != meta.get("tensor_fields") or not isinstance(json_fields, dict):
        raise CorruptCache(f"{folder}: the fields of {META_FILE} and {LATENTS_FILE} disagree")
    bad = [k for k, v in tensor_fields.items() if v.shape[0] != n] + [k for k, v in json_fields.items()
                                                                       if not isinstance(v, list) or len(v) != n]
    if bad:
        raise CorruptCache(f"{folder}: fields {bad} do not have {n} entries")
    return LatentDataset(mean, std, tensor_fields=tensor_fields, json_fields=json_fields, seed=seed, key=key,
                         folder=folder)


def build_or_load_latent_cache(dataset, autoencoder, *, root, identity: dict, mode: str = "sample",
                               pool: int | None = None, batch_size: int = 64, device=None, progress: bool = False,
                               image_key: str = "image", fields: Sequence[str] | None = None,
                               seed: int = 0) -> LatentDataset:
    """The cached latents of ``dataset`` under ``root``: read when a valid cache with the same key exists,
    otherwise encoded with ``autoencoder`` (frozen, eval mode, no gradients) and written atomically.

    Args:
        dataset: map-style dataset of dicts with ``image_key`` (C, H, W) in [-1, 1] and condition fields.
        autoencoder: the first stage (:class:`~latentdiff.nn.autoencoder.Autoencoder`, possibly wrapped).
        root: folder that holds caches, one sub-folder per key.
        identity: JSON-able dict naming the dataset (e.g. its data settings, length, split and seed); part of the key.
        mode: "sample" (store μ and σ, draw z per access) or "mean" (store μ); VQ stores its latent either way.
        pool: cache only the first ``pool`` items (a procedural dataset such as shapes is endless: the pool
            is the fixed set the model then trains on); None = all. More than the dataset has caches all.
        batch_size: images per encoder call while building.
        device: where to encode (default: the autoencoder's device); the model is moved back afterwards.
        progress: show a progress bar while encoding.
        image_key: the item key of the image.
        fields: item keys to keep besides the image (None: every tensor or JSON-able one).
        seed: seed of the returned dataset's ``generator`` (sample mode draws).
    """
    n = len(dataset)
    if pool is not None:
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"latent cache: pool must be a positive int or None, got {pool!r}")
        n = min(n, pool)
    if n < 1:
        raise ValueError("latent cache: the dataset is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"latent cache: batch_size must be a positive int, got {batch_size!r}")
    key = cache_key(identity, autoencoder, mode=mode, count=n, image_key=image_key, fields=fields)
    folder = Path(root) / key_hash(key)
    if folder.exists():
        try:
            return _load(folder, key, seed)
        except CorruptCache as e:
            warnings.warn(f"latent cache {folder} is unusable ({e}); rebuilding it", stacklevel=2)
    mean, std, tensor_fields, json_fields = encode_dataset(
        dataset, autoencoder, count=n, mode=key["mode"], image_key=image_key, fields=fields, batch_size=batch_size,
        device=device, progress=progress)
    ds = LatentDataset(mean, std, tensor_fields=tensor_fields, json_fields=json_fields, seed=seed, key=key,
                       folder=folder)
    _write(folder, key, ds)
    return ds
