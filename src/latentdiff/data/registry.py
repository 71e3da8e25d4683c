"""Datasets by name: ``make_dataset("digits", size=16)`` or ``make_dataset(config.data)``.

Every dataset is built from the same settings (those of the config's data section): name, root, size,
channels, crop, flip, split, captions, labels, seed, plus ``options`` (keyword arguments only one dataset
knows). A setting a dataset does not use must stay at its default: ``flip: true`` for digits is an error, not
a silent no-op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError, ConfigTypeError

# The shared settings and their defaults (mirrors config.DataSection; this module does not import config).
DEFAULTS: dict[str, Any] = {
    "root": None,
    "size": None,
    "channels": None,
    "crop": "center",
    "flip": False,
    "split": "train",
    "captions": "auto",
    "labels": "auto",
    "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    build: Callable[[dict], Dataset]  # settings dict (DEFAULTS keys + "options") -> dataset
    uses: frozenset                   # settings of DEFAULTS it reads; the others must keep their defaults
    splits: tuple = ("train",)        # accepted values of "split"


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, build: Callable[[dict], Dataset], uses=(), splits=("train",)) -> None:
    """Add a dataset under ``name``; ``build`` receives the resolved settings dict."""
    DATASETS[name] = DatasetEntry(build, frozenset(uses) | {"seed", "split"}, tuple(splits))


def _settings(spec, overrides: dict) -> tuple[str, dict]:
    if isinstance(spec, str):
        raw = {"name": spec}
    elif dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        raw = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    elif isinstance(spec, Mapping):
        raw = dict(spec)
    else:
        raise TypeError(f"make_dataset expects a name, a mapping or a data config, got {type(spec).__name__}")
    raw.update(overrides)
    name = raw.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError("the dataset settings need a 'name'")
    options = dict(raw.pop("options", None) or {})
    settings = dict(DEFAULTS)
    for k, v in raw.items():
        if k in DEFAULTS:
            settings[k] = v
        else:
            options[k] = v  # a dataset-specific keyword
    settings["options"] = options
    return name, settings


def make_dataset(spec, **overrides) -> Dataset:
    """Build a dataset from a name (+ keyword settings), a mapping, or a data config section."""
    name, s = _settings(spec, overrides)
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(DATASETS))}")
    entry = DATASETS[name]
    for k, default in DEFAULTS.items():
        if k not in entry.uses and s[k] != default:
            raise ConfigError(f"dataset {name!r} does not use the setting {k!r} (got {s[k]!r}); remove it")
    if s["split"] not in entry.splits:
        raise ConfigError(f"dataset {name!r} has no split {s['split']!r}; expected one of {', '.join(entry.splits)}")
    try:
        return entry.build(s)
    except TypeError as e:  # most often an unknown keyword in options
        if "keyword" in str(e):
            raise ConfigTypeError(f"dataset {name!r}: bad option in {sorted(s['options'])}: {e}") from None
        raise


def _require(s: dict, key: str, name: str):
    if s[key] is None:
        raise ConfigError(f"dataset {name!r} needs the setting {key!r} (data.{key} in a config)")
    return s[key]


def _fixed(s: dict, key: str, value, name: str):
    if s[key] is not None and s[key] != value:
        raise ConfigError(f"dataset {name!r} has {key} {value}, got {s[key]!r}")


def _build_folder(s: dict) -> Dataset:
    from .folder import ImageFolder

    return ImageFolder(
        _require(s, "root", "folder"),
        _require(s, "size", "folder"),
        channels=3 if s["channels"] is None else s["channels"],
        crop=s["crop"],
        flip=s["flip"],
        captions=s["captions"],
        labels=s["labels"],
        seed=s["seed"],
        **s["options"],
    )


def _build_cifar10(s: dict) -> Dataset:
    from .cifar10 import CIFAR10

    _fixed(s, "size", 32, "cifar10")
    _fixed(s, "channels", 3, "cifar10")
    return CIFAR10(_require(s, "root", "cifar10"), train=s["split"] == "train", flip=s["flip"], seed=s["seed"],
                   **s["options"])


def _build_digits(s: dict) -> Dataset:
    from .digits import Digits

    _fixed(s, "channels", 1, "digits")
    return Digits(8 if s["size"] is None else s["size"], s["split"], **s["options"])


def _build_shapes(s: dict) -> Dataset:
    from .shapes import ShapesDataset  # the procedural shapes world (data/shapes.py)

    _fixed(s, "channels", 3, "shapes")
    options = dict(s["options"])
    if s["size"] is not None:
        options["size"] = s["size"]
    return ShapesDataset(split=s["split"], seed=s["seed"], **options)


def _build_shards(s: dict) -> Dataset:
    from .shards import ShardStream  # webdataset tar shards, streamed (data/shards.py)

    return ShardStream(_require(s, "root", "shards"), size=s["size"], channels=3 if s["channels"] is None else
                       s["channels"], seed=s["seed"], **s["options"])


def _build_photos(s: dict) -> Dataset:
    from .photos import Photos  # crops of the photos scikit-learn ships (data/photos.py)

    _fixed(s, "channels", 3, "photos")
    return Photos(32 if s["size"] is None else s["size"], s["split"], seed=s["seed"], **s["options"])


register_dataset("folder", _build_folder, uses=("root", "size", "channels", "crop", "flip", "captions", "labels"))
register_dataset("cifar10", _build_cifar10, uses=("root", "size", "channels", "flip"), splits=("train", "test"))
register_dataset("digits", _build_digits, uses=("size", "channels"), splits=("train", "test", "all"))
register_dataset("shards", _build_shards, uses=("root", "size", "channels"))
register_dataset("shapes", _build_shapes, uses=("size", "channels"), splits=("train", "test"))
register_dataset("photos", _build_photos, uses=("size", "channels"), splits=("train", "test"))
