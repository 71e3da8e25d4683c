"""`photos`: crops of the two colour photographs that scikit-learn ships (``sklearn/datasets/images``: china.jpg, a
temple in China, and flower.jpg, a flower; 427 x 640 each, CC-BY, see that folder's README.txt). Nothing is
downloaded: the files come with the package (the ``demo`` or ``test`` extra installs it).

Item i of a split is a ``size`` x ``size`` crop at a position drawn from (seed, split, i), so the dataset is endless
and deterministic like ``shapes``. The split is by region: the left 80 % of each photo's width is ``train``, the
right 20 % ``test``, so no test pixel is ever seen in training. Items: ``{"image": (3, size, size) in [-1, 1],
"index": i}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, MissingFileError

PHOTOS = ("china.jpg", "flower.jpg")
TRAIN_SHARE = 0.8  # of each photo's width
SPLITS = ("train", "test")


def photo_arrays() -> list[np.ndarray]:
    """The shipped photos as (H, W, 3) uint8 arrays; a MissingFileError when scikit-learn is not installed."""
    try:
        import sklearn.datasets
    except ImportError:
        raise MissingFileError("the photos dataset reads the images scikit-learn ships: pip install "
                               "'latentdiff[demo]' (scikit-learn)") from None
    from PIL import Image

    folder = Path(sklearn.datasets.__file__).parent / "images"
    out = []
    for name in PHOTOS:
        with Image.open(folder / name) as img:
            out.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return out


class Photos(Dataset):
    """Random ``size`` x ``size`` crops of one split of the shipped photos (see the module docstring)."""

    def __init__(self, size: int = 32, split: str = "train", length: int = 20_000, seed: int = 0):
        if split not in SPLITS:
            raise ConfigError(f"photos: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"photos: size must be a positive int, got {size!r}")
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"photos: length must be a positive int, got {length!r}")
        self.size, self.split, self.length, self.seed = size, split, length, int(seed)
        self.regions = []
        for arr in photo_arrays():
            cut = int(arr.shape[1] * TRAIN_SHARE)
            region = arr[:, :cut] if split == "train" else arr[:, cut:]
            if min(region.shape[:2]) < size:
                raise ConfigError(f"photos: size {size} exceeds the {split} region {region.shape[0]}x{region.shape[1]}")
            self.regions.append(region)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"photos: index {index} out of range for length {self.length}")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        region = self.regions[int(rng.integers(len(self.regions)))]
        y = int(rng.integers(0, region.shape[0] - self.size + 1))
        x = int(rng.integers(0, region.shape[1] - self.size + 1))
        crop = region[y : y + self.size, x : x + self.size]
        image = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": image, "index": int(index)}
