"""latentdiff.data: datasets of images in [-1, 1] as dicts, and their transforms.

- :class:`ImageFolder`: your images, with captions/labels from metadata.jsonl or sidecar .txt files.
- :class:`CIFAR10`: from the local python batches (never downloaded; pickles read with a restricted unpickler).
- :class:`Digits`: scikit-learn's bundled 8x8 digits (needs the ``demo`` extra).
- ``shapes``: the procedural shapes world (:mod:`latentdiff.data.shapes`, imported on first use).
- :func:`make_dataset`: any of them by name or from a config's data section.

Items are dicts: ``{"image": (C, H, W) float32 in [-1, 1], "label": int, "caption": str, "path": str,
"index": int}`` (label/caption where the dataset has them). Datasets with random transforms have
``set_epoch(e)``; item i of epoch e then depends only on (seed, e, i), so resumed runs see the same data.
"""

from .cifar10 import CIFAR10
from .digits import Digits
from .folder import ImageFolder
from .registry import DATASETS, make_dataset, register_dataset

__all__ = ["CIFAR10", "DATASETS", "Digits", "ImageFolder", "make_dataset", "register_dataset"]
