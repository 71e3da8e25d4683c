"""Reference statistics, computed once per (dataset, feature network) and cached in an .npz file.

The cache key is a hash of two identities:
- the dataset's: a dict such as ``dataset_identity("digits", size=1797, resolution=16, split="train")``,
  optionally with ``files=files_fingerprint(paths)`` (names, sizes and mtimes) for image folders;
- the feature network's ``fingerprint()`` (a hash of its weights).
Changing either gives another key, hence another file, so stale statistics are never reused. The file
holds n, mean (D,) float64, cov (D, D) float64, the kept features (and logits) float32, and the identities
as JSON. Files are written to a temporary name and renamed (atomic).

``latentdiff eval`` keeps them under ``cache_root()/fid_stats`` and its oracles under ``cache_root()/oracles``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import DataError, MissingFileError
from ..fileio import atomic_write
from .features import extract_stats
from .metrics import FeatureStats

CACHE_VERSION = 1
CACHE_ENV = "LATENTDIFF_CACHE"


def cache_root(path=None) -> Path:
    """``path``, else ``$LATENTDIFF_CACHE``, else ``~/.cache/latentdiff``."""
    return Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentdiff").expanduser()


def dataset_identity(name: str, size: int, resolution, split: str | None = None, **extra) -> dict:
    """The identity of a reference dataset: name, number of images, resolution, split, and any extra
    JSON-serialisable facts that change its images (channels, seed, transform, files fingerprint...)."""
    ident = {"name": str(name), "size": int(size), "resolution": resolution, "split": split}
    ident.update(extra)
    json.dumps(ident)  # fail early on values that cannot key a cache
    return ident


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 (16 hex digits) of sorted file names with their sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        st = os.stat(p)
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_key(dataset_id: dict, network_fingerprint: str) -> str:
    blob = json.dumps({"dataset": dataset_id, "network": network_fingerprint, "version": CACHE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(cache_dir: str | os.PathLike, dataset_id: dict, network_fingerprint: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(dataset_id.get("name", "data")))[:40]
    return Path(cache_dir) / f"{slug}-{cache_key(dataset_id, network_fingerprint)}.npz"


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: dict | None = None) -> Path:
    """Write stats (+ JSON meta) to ``path`` atomically: a temporary file in the same folder, then rename."""
    arrays = {"n": np.array(stats.n, np.int64), "mean": stats.mean, "cov": stats.cov,
              "features": stats.features, "meta": np.array(json.dumps(meta or {}, sort_keys=True))}
    if stats.logits is not None:
        arrays["logits"] = stats.logits
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict]:
    """Read a statistics file written by save_stats -> (FeatureStats, meta). No pickle is loaded."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            need = {"n", "mean", "cov", "features", "meta"}
            if not need <= set(z.files):
                raise ValueError(f"missing arrays {sorted(need - set(z.files))}")
            stats = FeatureStats.from_moments(int(z["n"]), z["mean"], z["cov"], z["features"],
                                              z["logits"] if "logits" in z.files else None)
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise DataError(f"corrupt statistics file {path}: {e}") from e
    return stats, meta


def reference_stats(net, source, *, dataset_id: dict, cache_dir: str | os.PathLike,
                    indices: Sequence[int] | None = None, batch_size: int = 64, max_items: int | None = None,
                    max_kept: int | None = None, recompute: bool = False, device=None,
                    progress: bool = False) -> FeatureStats:
    """Statistics of a reference dataset under a feature network, from the cache when its key matches.

    ``dataset_id`` must describe exactly the images that ``source`` (with ``indices`` and ``max_items``)
    yields; those arguments are folded into the key too. A corrupt cache file is recomputed with a warning.
    """
    ident = dict(dataset_id, indices=None if indices is None else _indices_hash(indices),
                 max_items=max_items, max_kept=max_kept)
    net_id = net.fingerprint()
    path = cache_path(cache_dir, ident, net_id)
    meta_want = {"dataset": ident, "network": net_id, "version": CACHE_VERSION}
    if path.is_file() and not recompute:
        try:
            stats, meta = load_stats(path)
            if json.dumps(meta, sort_keys=True) == json.dumps(meta_want, sort_keys=True):
                return stats
            warnings.warn(f"statistics cache {path} has other identities; recomputing", RuntimeWarning, stacklevel=2)
        except ValueError as e:
            warnings.warn(f"{e}; recomputing", RuntimeWarning, stacklevel=2)
    stats = extract_stats(net, source, batch_size=batch_size, indices=indices, max_items=max_items,
                          max_kept=max_kept, device=device, progress=progress)
    save_stats(path, stats, meta_want)
    return stats


def _indices_hash(indices: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(list(indices), np.int64).tobytes()).hexdigest()[:16]
