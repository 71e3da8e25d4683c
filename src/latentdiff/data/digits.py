"""The 8x8 handwritten digits that scikit-learn ships (UCI optical digits test set: 1,797 images, 10 classes).

The data file is inside the scikit-learn package, so nothing is downloaded. Pixel values 0..16 map to
[-1, 1] (x / 8 - 1: background -1, ink +1). Images are upscaled (bilinear or nearest) or zero-padded to
``size``. The train/test split is a fixed permutation (numpy seed 0), the same on every machine.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError

NUM_IMAGES = 1797
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "test", "all")
RESIZE_MODES = ("bilinear", "nearest", "pad")
_SPLIT_SEED = 0  # the permutation behind the train/test split; changing it changes every split


_INSTALL_HINT = (
    "the digits dataset needs scikit-learn, which ships its 8x8 images; "
    "install the demo extra: pip install 'latentdiff[demo]' (or pip install scikit-learn)"
)


@functools.lru_cache(maxsize=2)
def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",")  # (1797, 65): 64 pixels then the label
    if table.shape != (NUM_IMAGES, 65):
        raise DataError(f"{path}: expected a ({NUM_IMAGES}, 65) table, got {table.shape}")
    return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels (1797,) int64) from scikit-learn's bundled copy.

    Reads the CSV inside the installed scikit-learn package directly (what ``sklearn.datasets.load_digits``
    reads), which skips importing scikit-learn itself (seconds); falls back to ``load_digits`` if the file moved.
    """
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):  # ValueError: sklearn is in sys.modules without a spec
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        images, labels = _read_csv(str(csv))
        return images.copy(), labels.copy()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def split_indices(n: int, split: str, test_fraction: float) -> np.ndarray:
    """Indices of ``split`` under a fixed permutation of 0..n-1: the last round(n * test_fraction) are test."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = round(n * test_fraction)
    if split == "all":
        return np.arange(n)
    return np.sort(perm[: n - n_test] if split == "train" else perm[n - n_test :])


class Digits(Dataset):
    """scikit-learn's 8x8 digits as 1-channel images of ``size`` x ``size`` in [-1, 1], labels 0..9.

    Args:
        size: output side, >= 8 (8 is the native size; 16 is the usual demo size).
        split: ``train`` (80%), ``test`` (20%) or ``all``, from a fixed permutation.
        resize: how to reach ``size``: ``bilinear`` or ``nearest`` upscaling, or ``pad`` (centred, background -1).
        test_fraction: share of the test split.

    Items: ``{"image": (1, size, size) float32, "label": int, "caption": "a handwritten seven", "index": int,
    "path": "digits[i]"}`` where i is the position in scikit-learn's array.
    """

    def __init__(self, size: int = 8, split: str = "train", *, resize: str = "bilinear", test_fraction: float = 0.2):
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ConfigError(f"digits size must be an int >= 8, got {size!r}")
        if resize not in RESIZE_MODES:
            raise ConfigError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        images, labels = load_digits_array()
        keep = split_indices(len(images), split, test_fraction)
        x = torch.from_numpy(images[keep]).to(torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
        if size != 8:
            if resize == "pad":
                lo = (size - 8) // 2
                x = F.pad(x, (lo, size - 8 - lo, lo, size - 8 - lo), value=-1.0)
            elif resize == "nearest":
                x = F.interpolate(x, size=(size, size), mode="nearest")
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
        self.images = x.contiguous()  # (N, 1, size, size)
        self.targets = labels[keep]
        self.source_index = keep
        self.split, self.resize = split, resize
        self.size, self.channels = (size, size), 1
        self.classes, self.num_classes, self.has_captions = [str(i) for i in range(10)], 10, True

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if isinstance(index, tuple):  # (index, epoch): no random transforms here, the epoch changes nothing
            index = index[0]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        label = int(self.targets[index])
        return {
            "image": self.images[index].clone(),
            "label": label,
            "caption": f"a handwritten {WORDS[label]}",
            "path": f"digits[{int(self.source_index[index])}]",
            "index": index,
        }

    def set_epoch(self, epoch: int) -> None:
        """No random transforms; present so every dataset can be told its epoch."""

    def __repr__(self) -> str:
        return f"Digits(split={self.split!r}, n={len(self)}, size={self.size[0]}, resize={self.resize!r})"
