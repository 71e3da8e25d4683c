"""The real images a model is scored against, as feature statistics.

    ref = load_reference(None, net, pipe=pipe)          # the model's training data
    ref = load_reference("runs/real_images", net)       # an image folder
    ref = load_reference("digits-1a2b.npz", net)        # statistics written by an earlier eval

Statistics of a dataset or folder are cached under ``cache_root()/fid_stats``, keyed by the identity of
the images and of the feature network (see stats_cache), and ``Reference.info["stats_file"]`` names the
file, to be reused as a reference.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.folder import folder_dataset
from ..errors import MissingFileError, RequestError
from .metrics import FeatureStats
from .stats_cache import cache_path, cache_root, dataset_identity, files_fingerprint, load_stats, reference_stats


@dataclass
class Reference:
    stats: FeatureStats   # features (all kept) of the real images
    info: dict = field(default_factory=dict)  # kind (dataset | folder | stats), name, split, n, stats_file
    dataset: object = field(default=None, repr=False)  # the images, row i of the features = item i (None: a
                                                       # statistics file); the first stage's ceiling needs them


def dataset_for(data_section, split: str | None):
    """The dataset of a config's data section at ``split`` (None: the section's own), with random crops and
    flips off: the reference images, as the model saw them."""
    from ..data import make_dataset

    section = dataclasses.replace(data_section, flip=False, crop="center",
                                  **({} if split is None else {"split": split}))
    return make_dataset(section), section


def _cached_reference(net, source, ident, *, kind, cache, max_items, batch_size, device, progress) -> Reference:
    cache_dir = cache_root(cache) / "fid_stats"
    stats = reference_stats(net, source, dataset_id=ident, cache_dir=cache_dir, max_items=max_items,
                            batch_size=batch_size, device=device, progress=progress)
    # The file reference_stats wrote or read (the same key it uses), to be reused as --reference FILE.
    path = cache_path(cache_dir, dict(ident, indices=None, max_items=max_items, max_kept=None), net.fingerprint())
    return Reference(stats, {"kind": kind, "name": ident["name"], "split": ident.get("split"), "n": stats.n,
                             "stats_file": str(path) if path.is_file() else None}, dataset=source)


def load_reference(spec, net, *, pipe=None, split: str | None = None, size: int | None = None,
                   channels: int | None = None, cache=None, max_items: int | None = None, batch_size: int = 64,
                   device=None, progress: bool = False) -> Reference:
    """Reference statistics from ``spec``: None (the training data of ``pipe``'s config), a .npz statistics
    file (used as it is; it must come from the same feature network), an image folder, or a dataset name
    (data.DATASETS). Folders and datasets are cached by their identity and the network's."""
    from ..data import DATASETS

    if pipe is not None:
        size = pipe.config.data.size if size is None else size
        channels = pipe.config.data.channels if channels is None else channels
    cached = {"cache": cache, "max_items": max_items, "batch_size": batch_size, "device": device, "progress": progress}
    if spec is None or (isinstance(spec, str) and spec in DATASETS and not Path(spec).exists()):
        return _dataset_reference(spec, net, pipe=pipe, split=split, size=size, channels=channels, **cached)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(f"reference {str(spec)!r} not found: expected an image folder, a .npz statistics "
                               f"file or a dataset name ({', '.join(sorted(DATASETS))})")
    if path.is_dir():
        if channels is None:  # the oracle's channels; Inception takes RGB
            channels = getattr(getattr(net, "config", None), "in_channels", 3)
        ds = folder_dataset(path, size=size, channels=channels)
        ident = dataset_identity(f"folder:{path.resolve()}", len(ds), list(ds.size), None, channels=channels,
                                 files=files_fingerprint(ds.paths))
        return _cached_reference(net, ds, ident, kind="folder", **cached)
    return _stats_reference(path, net)


def _dataset_reference(name, net, *, pipe, split, size, channels, **cached) -> Reference:
    """The statistics of dataset ``name`` (None: ``pipe``'s training data, with its config's data section)."""
    if name is None and pipe is None:
        raise RequestError("no reference: give a model, or a reference folder, statistics file or dataset")
    if pipe is not None and (name is None or name == pipe.config.data.name):
        section = pipe.config.data
    else:
        from ..config import DataSection
        section = DataSection(name=name, size=size, channels=channels)
    try:
        ds, section = dataset_for(section, split)
    except FileNotFoundError as e:
        raise MissingFileError(f"{e} (the reference defaults to the model's training data; pass "
                               "--reference FOLDER, STATS.npz or a dataset name)") from None
    ident = dataset_identity(section.name, len(ds), section.size, section.split,
                             data=json.loads(json.dumps(dataclasses.asdict(section), default=str)))
    return _cached_reference(net, ds, ident, kind="dataset", **cached)


def _stats_reference(path: Path, net) -> Reference:
    """A .npz statistics file, checked against the feature network it must come from."""
    if path.suffix != ".npz":
        raise RequestError(f"reference {path} is a file but not a .npz statistics file")
    stats, meta = load_stats(path)
    want = net.fingerprint()
    if meta.get("network") not in (None, want):
        raise RequestError(f"statistics file {path} was computed with another feature network "
                           f"({meta['network']}), not this one ({want})")
    if stats.dim != getattr(net, "feature_dim", stats.dim):
        raise RequestError(f"statistics file {path} has {stats.dim}-d features; the network gives {net.feature_dim}")
    ds_meta = meta.get("dataset", {})
    return Reference(stats, {"kind": "stats", "name": ds_meta.get("name", str(path)), "split": ds_meta.get("split"),
                             "n": stats.n, "stats_file": str(path)})
