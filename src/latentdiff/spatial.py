"""Spatial conditions: the fields of a batch -> the (B, C, H, W) tensor that is concatenated to z_t.

LDM conditions several tasks by concatenation (Rombach et al. 2022, sec. 3.3 and 4.3-4.5): a segmentation map
(semantic synthesis), a low-resolution image (super-resolution), a mask and the masked image (inpainting). Each
is a :class:`SpatialCondition`, registered by name in :data:`SPATIAL_CONDITIONS` and chosen by a recipe's
``conditioning.concat``. One method, :meth:`SpatialCondition.make`, builds the tensor from a batch of fields,
both in training (the collated data items, or the fields stored beside cached latents) and in sampling
(``Pipeline.sample(conditions={...})`` gets the same field names), so the two can never disagree.

    spatial = build_spatial("segmentation", {"classes": 24})
    concat = spatial.make({"segmentation": seg})        # (B, 25, H, W) one-hot, seg (B, H, W) long
    kwargs = conditioner({"concat": concat, ...})        # the conditioner's rescaler takes it to the latent grid

A condition returns its tensor at pixel resolution (the conditioner's SpatialRescaler, LDM's, resizes it to
the latent grid) or at the latent grid directly (conditions that run the first stage themselves, through the
``encode`` callable they are given).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import ConfigError, RequestError

SPATIAL_CONDITIONS: dict[str, type["SpatialCondition"]] = {}


def register(cls: type["SpatialCondition"]) -> type["SpatialCondition"]:
    """Class decorator: make ``cls`` available as ``conditioning.concat: <cls.name>``."""
    SPATIAL_CONDITIONS[cls.name] = cls
    return cls


class SpatialCondition:
    """A spatially aligned condition, built from named fields of a batch.

    Subclasses set ``name`` and ``fields`` (the batch keys :meth:`make` reads; a latent cache stores them
    beside the latents) and implement :meth:`channels` and :meth:`make`. Constructor keywords are the
    recipe's ``conditioning.concat_options``; unknown ones are a ConfigError naming them.
    """

    name: str = ""
    fields: tuple[str, ...] = ()          # what the training data gives (and a latent cache stores)
    sample_fields: tuple[str, ...] | None = None  # what sampling needs; None = ``fields``
    optional_fields: tuple[str, ...] = ()  # what sampling may add (e.g. a noise level)
    adm_classes: int | None = None        # classes of a label it feeds the U-Net as ``y`` (a noise level); None
    cacheable: bool = True                # False: its input changes at every step (random masks), no latent cache

    def __init__(self, **options):
        if options:
            raise ConfigError(f"conditioning.concat_options: {self.name!r} takes no option(s) {sorted(options)}")

    @property
    def channels(self) -> int:
        """Channels of the tensor :meth:`make` returns (the conditioner's ``concat_channels``)."""
        raise NotImplementedError

    def make(self, batch: dict, *, encode: Callable | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, channels, H, W) float from ``batch[field]`` for each field of :attr:`fields`."""
        raise NotImplementedError

    def inputs(self, batch: dict, *, encode: Callable | None = None, generator: torch.Generator | None = None,
               training: bool = False) -> dict:
        """The U-Net inputs made from ``batch``: ``{"concat": make(...)}``, plus ``"y"`` (B,) long for a condition
        with :attr:`adm_classes`. ``training`` marks a training batch (random augmentation, random masks)."""
        return {"concat": self.make(batch, encode=encode, generator=generator)}

    def derive(self, item: dict) -> dict:
        """A training data item with the fields this condition computes from it (before any latent cache)."""
        return item

    @property
    def required_at_sampling(self) -> tuple[str, ...]:
        return self.fields if self.sample_fields is None else self.sample_fields

    def image_size(self, batch: dict) -> tuple[int, int] | None:
        """The image size (H, W) in pixels that the fields of ``batch`` imply (sampling at that size), or None."""
        return None

    def options(self) -> dict:
        """The constructor keywords that rebuild this condition (saved in the model's config)."""
        return {}

    def field(self, batch: dict, key: str) -> torch.Tensor:
        """``batch[key]`` as a tensor, or a RequestError naming the missing field."""
        if key not in batch:
            raise RequestError(f"the {self.name!r} condition needs the field {key!r}; got {sorted(batch)}")
        value = batch[key]
        if not torch.is_tensor(value):
            raise RequestError(f"the {self.name!r} condition's field {key!r} must be a tensor, "
                               f"got {type(value).__name__}")
        return value


@register
class Segmentation(SpatialCondition):
    """A semantic map as one-hot channels (LDM sec. 4.3.2, semantic synthesis): ``segmentation`` (B, H, W) long
    class ids, 0 = background and k = 1..classes an object class, -> (B, classes + 1, H, W) float in {0, 1}."""

    name = "segmentation"
    fields = ("segmentation",)

    def __init__(self, classes: int | None = None, **options):
        super().__init__(**options)
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise ConfigError(f"conditioning.concat_options.classes must be a positive integer (object classes, "
                              f"background excluded), got {classes!r}")
        self.classes = classes

    @property
    def channels(self) -> int:
        return self.classes + 1

    def options(self) -> dict:
        return {"classes": self.classes}

    def make(self, batch, *, encode=None, generator=None):
        seg = self.field(batch, "segmentation")
        if seg.dim() != 3 or seg.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise RequestError(f"segmentation must be a (B, H, W) integer tensor of class ids, "
                               f"got {tuple(seg.shape)} {seg.dtype}")
        seg = seg.long()
        if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) > self.classes):
            bad = sorted({int(v) for v in seg.unique() if not 0 <= int(v) <= self.classes})
            raise RequestError(f"segmentation holds class id(s) {bad[:10]} outside 0..{self.classes} "
                               f"(0 = background, 1..{self.classes} the object classes)")
        return F.one_hot(seg, self.channels).permute(0, 3, 1, 2).float()

    def image_size(self, batch):
        seg = batch.get("segmentation")
        return tuple(seg.shape[-2:]) if torch.is_tensor(seg) else None


class DerivedFields(Dataset):
    """A dataset whose items pass through ``condition.derive`` (e.g. the low-resolution image of each item)."""

    def __init__(self, dataset, condition: SpatialCondition):
        self.dataset, self.condition = dataset, condition

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.condition.derive(self.dataset[index])

    def __getattr__(self, name):  # num_classes, paths, captions, ... of the wrapped dataset
        if name in ("dataset", "condition"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_derived_fields(dataset, condition: SpatialCondition | None):
    """``dataset`` wrapped by :class:`DerivedFields` when ``condition`` derives fields, else itself."""
    if condition is None or type(condition).derive is SpatialCondition.derive:
        return dataset
    return DerivedFields(dataset, condition)


def build_spatial(name: str, options: dict | None = None) -> SpatialCondition:
    """The registered condition ``name`` with its ``options`` (``conditioning.concat`` / ``concat_options``)."""
    if name not in SPATIAL_CONDITIONS:
        raise ConfigError(f"conditioning.concat: unknown spatial condition {name!r}; "
                          f"known: {', '.join(sorted(SPATIAL_CONDITIONS))}")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"conditioning.concat_options must be a mapping, got {type(options).__name__}")
    return SPATIAL_CONDITIONS[name](**(options or {}))

