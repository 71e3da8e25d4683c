"""CIFAR-10 from the local files of its "python version" (``cifar-10-batches-py``); never downloads.

The python version is a set of pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``),
each a dict with ``b"data"`` (N, 3072) uint8 (1024 red, 1024 green, 1024 blue values, rows of 32) and
``b"labels"`` (N ints 0..9). A pickle can run arbitrary code when loaded, so these files are read with
:class:`RestrictedUnpickler`, which resolves only the handful of globals that a numpy array needs (the array
reconstructor, ``ndarray``, ``dtype`` without object fields, and latin-1 ``_codecs.encode`` that Python 3
uses for bytes in old protocols); any other global, e.g. ``os.system``, raises :class:`UnsafePickleError` (a
``pickle.UnpicklingError``).
Non-object containers (dict, list, bytes, str, int) need no globals at all.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, MissingFileError
from .transforms import item_generator, random_flip

FOLDER_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
# The published label order (batches.meta's label_names); used when batches.meta is absent.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array reconstructor, whatever module numpy keeps it in


class UnsafePickleError(DataError, pickle.UnpicklingError):
    """A data pickle asked for something other than plain data (a global outside the allowed few)."""


def _safe_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafePickleError("refusing a numpy array of Python objects in a data file")
    return dt


def _latin1_encode(text, encoding="latin1"):
    if codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: only the globals of plain numpy arrays resolve; everything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x pickles (the published files)
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x pickles
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data file") from None


def load_pickle(path) -> object:
    """Load a data pickle with :class:`RestrictedUnpickler` (python-2 strings come back as bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbage file
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None


def _get(d: dict, key: str):
    """d[key] for a dict loaded with bytes keys (python-2 pickles) or str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def find_batches_folder(root) -> Path:
    """``root`` itself if it holds the batches, else ``root/cifar-10-batches-py``."""
    root = Path(root).expanduser()
    if not root.exists():
        raise MissingFileError(f"CIFAR-10 folder {str(root)!r} does not exist")
    for cand in (root, root / FOLDER_NAME):
        if (cand / TRAIN_FILES[0]).exists() or (cand / TEST_FILES[0]).exists():
            return cand
    return root / FOLDER_NAME if (root / FOLDER_NAME).is_dir() else root


def load_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one batch file, validated."""
    d = load_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}")
    try:
        data, labels = _get(d, "data"), _get(d, "labels")
    except KeyError as e:
        raise DataError(f"{path}: missing key {e.args[0]!r}") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} ints, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)  # (N, C, H, W): planes R, G, B of 32 rows


class CIFAR10(Dataset):
    """CIFAR-10 (Krizhevsky 2009): 32x32 RGB images in 10 classes, 50,000 train / 10,000 test.

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent (as extracted from the published tarball).
        train: the five training batches if True, else ``test_batch``.
        flip: random horizontal flip with probability 1/2 (the usual CIFAR augmentation for diffusion).
        seed: seed of the flips; item i of epoch e draws from (seed, e, i), see :meth:`set_epoch`.

    Items: ``{"image": (3, 32, 32) float32 in [-1, 1], "label": int, "caption": class name, "path", "index"}``.
    """

    def __init__(self, root, train: bool = True, *, flip: bool = False, seed: int = 0):
        folder = find_batches_folder(root)
        names = TRAIN_FILES if train else TEST_FILES
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise MissingFileError(
                f"CIFAR-10 file {str(folder / missing[0])!r} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; extract cifar-10-python.tar.gz there (the python version; nothing is downloaded)"
            )
        arrays = [load_batch(folder / n) for n in names]
        self.images = np.concatenate([a for a, _ in arrays])  # (N, 3, 32, 32) uint8
        self.targets = np.concatenate([lab for _, lab in arrays])  # (N,)
        self._origin = [(n, i) for n, (a, _) in zip(names, arrays) for i in range(len(a))]
        self.classes = list(CLASSES)
        if (folder / META_FILE).is_file():
            meta = load_pickle(folder / META_FILE)
            try:
                names_ = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, "label_names")]
            except (KeyError, TypeError, AttributeError):
                raise DataError(f"{folder / META_FILE}: expected a dict with 'label_names'") from None
            if len(names_) != 10:
                raise DataError(f"{folder / META_FILE}: expected 10 label names, got {len(names_)}")
            self.classes = names_
        self.root, self.train, self.flip, self.seed, self.epoch = folder, bool(train), bool(flip), int(seed), 0
        self.num_classes, self.channels, self.size, self.has_captions = 10, 3, (32, 32), True

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random flips ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        epoch = self.epoch
        if isinstance(index, tuple):
            index, epoch = index
        return self.get(index, epoch=epoch)

    def get(self, index: int, *, generator: torch.Generator | None = None, epoch: int | None = None) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        x = torch.from_numpy(self.images[index]).to(torch.float32) / 127.5 - 1.0  # (3, 32, 32)
        if self.flip:
            if generator is None:
                generator = item_generator(self.seed, self.epoch if epoch is None else epoch, index)
            x = random_flip(x, generator)
        label = int(self.targets[index])
        name, i = self._origin[index]
        return {"image": x, "label": label, "caption": self.classes[label], "path": f"{name}[{i}]", "index": index}

    def __repr__(self) -> str:
        return f"CIFAR10({str(self.root)!r}, train={self.train}, n={len(self)})"
