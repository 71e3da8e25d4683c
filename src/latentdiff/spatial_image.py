"""Image conditions of LDM's super-resolution and inpainting models (Rombach et al. 2022, sec. 4.4 and 4.5).

- ``low_res``: the low-resolution image, concatenated to z_t at the latent grid (LDM's SR model on an f = 4
  first stage sees the 4x smaller image at exactly the latent size; otherwise the conditioner's rescaler resizes
  it). Optional noise augmentation (the Stable Diffusion x4 upscaler's, after Ho et al. 2022, "cascaded
  diffusion"): the low-resolution image is noised to one of ``noise_levels`` levels and the level enters the
  U-Net as a class label ``y`` (its label embedding, added to the time embedding: an ``adm`` input).
- ``inpaint``: the mask resized to the latent grid and the latent of the masked image, ℰ((1 − m)·x), as Stable
  Diffusion's inpainting U-Net takes them (4 + 1 + 4 input channels there); masks are drawn at random in training
  (data/masks.py: boxes and brush strokes covering 10-60 %, plus a share of all-masked images).

Both are registered in :data:`latentdiff.spatial.SPATIAL_CONDITIONS` (``conditioning.concat: low_res``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.masks import check_mask_options, random_masks
from .errors import ConfigError, RequestError
from .spatial import SpatialCondition, register


def _positive_int(name: str, value, lo: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"conditioning.concat_options.{name} must be an integer >= {lo}, got {value!r}")
    return value


def _image(condition: SpatialCondition, batch: dict, key: str, channels: int | None) -> torch.Tensor:
    """``batch[key]`` checked: (B, C, H, W) float, finite, in [-1, 1], C = ``channels`` when given."""
    x = condition.field(batch, key)
    if x.dim() != 4 or not x.is_floating_point():
        raise RequestError(f"{key} must be a (B, C, H, W) float tensor in [-1, 1], got {tuple(x.shape)} {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise RequestError(f"{key} has {x.shape[1]} channel(s); this model takes {channels}")
    if not torch.isfinite(x).all() or x.min() < -1.0 - 1e-4 or x.max() > 1.0 + 1e-4:
        raise RequestError(f"{key} must hold finite values in [-1, 1]")
    return x


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The degradation of the SR task: a box filter over factor x factor pixels ((B, C, H, W) -> (B, C, H/f, W/f))."""
    return F.interpolate(images, scale_factor=1 / factor, mode="area")


@register
class LowRes(SpatialCondition):
    """``low_res`` (B, C, h, w) in [-1, 1] -> itself (noise-augmented when ``noise_levels``), concatenated to z_t.

    Options: ``factor`` (the output is factor x the input; training items get ``low_res`` = their image box-filtered
    down by it), ``channels`` (of the image), ``noise_levels`` (0 = no augmentation; K >= 2: level k of 0..K-1 has
    noise std s_k = max_noise·k/(K−1), x' = √(1 − s_k²)·x + s_k·ε, drawn uniformly in training and fed as the label
    y), ``max_noise``, ``sample_level`` (the level used in sampling unless ``noise_level`` is given).
    """

    name = "low_res"
    fields = ("low_res",)
    optional_fields = ("noise_level",)

    def __init__(self, factor: int = 4, channels: int = 3, noise_levels: int = 0, max_noise: float = 0.3,
                 sample_level: int = 0, **options):
        super().__init__(**options)
        self.factor = _positive_int("factor", factor)
        self.image_channels = _positive_int("channels", channels)
        self.noise_levels = _positive_int("noise_levels", noise_levels, lo=0)
        if self.noise_levels == 1:
            raise ConfigError("conditioning.concat_options.noise_levels must be 0 (off) or >= 2")
        if not isinstance(max_noise, (int, float)) or not 0.0 < max_noise < 1.0:
            raise ConfigError(f"conditioning.concat_options.max_noise must lie in (0, 1), got {max_noise!r}")
        self.max_noise = float(max_noise)
        self.sample_level = _positive_int("sample_level", sample_level, lo=0)
        if self.sample_level >= max(self.noise_levels, 1):
            raise ConfigError(f"conditioning.concat_options.sample_level {sample_level} is not a level of "
                              f"0..{max(self.noise_levels - 1, 0)}")
        self.adm_classes = self.noise_levels or None

    @property
    def channels(self) -> int:
        return self.image_channels

    def options(self) -> dict:
        return {"factor": self.factor, "channels": self.image_channels, "noise_levels": self.noise_levels,
                "max_noise": self.max_noise, "sample_level": self.sample_level}

    def derive(self, item: dict) -> dict:
        if "low_res" in item:
            return item
        image = item["image"]
        if image.shape[-1] % self.factor or image.shape[-2] % self.factor:
            raise ConfigError(f"low_res: the image size {tuple(image.shape[-2:])} is not divisible by the factor "
                              f"{self.factor} (conditioning.concat_options.factor)")
        return {**item, "low_res": downsample(image[None], self.factor)[0]}

    def noise_std(self, level: torch.Tensor) -> torch.Tensor:
        """s_k of each level k (B,) -> (B, 1, 1, 1)."""
        return (self.max_noise * level.float() / (self.noise_levels - 1)).view(-1, 1, 1, 1)

    def make(self, batch, *, encode=None, generator=None):
        return self.inputs(batch, encode=encode, generator=generator)["concat"]

    def inputs(self, batch, *, encode=None, generator=None, training=False):
        x = _image(self, batch, "low_res", self.image_channels)
        if not self.noise_levels:
            return {"concat": x}
        b = x.shape[0]
        if training:
            level = torch.randint(0, self.noise_levels, (b,), generator=generator)
        else:
            given = batch.get("noise_level", self.sample_level)
            level = torch.as_tensor(given).reshape(-1).long()
            level = level.expand(b) if level.numel() == 1 else level
            if level.shape != (b,) or int(level.min()) < 0 or int(level.max()) >= self.noise_levels:
                raise RequestError(f"noise_level must be one level (or one per image) in 0..{self.noise_levels - 1}, "
                                   f"got {given!r}")
        eps = torch.randn(x.shape, generator=generator).to(x.device)
        s = self.noise_std(level).to(x.device)
        x = (1 - s**2).sqrt() * x + s * eps  # variance-preserving noising of the low-resolution image
        return {"concat": x, "y": level.to(x.device)}

    def image_size(self, batch):
        x = batch.get("low_res")
        return (x.shape[-2] * self.factor, x.shape[-1] * self.factor) if torch.is_tensor(x) else None


@register
class Inpaint(SpatialCondition):
    """``image`` (B, C, H, W) in [-1, 1] and ``mask`` (B, 1, H, W) in [0, 1] (1 = fill) -> (B, 1 + c, h, w): the
    mask resized to the latent grid (area: the share of each latent cell to fill) and ℰ((1 − m)·x), the latent of
    the masked image (pixel models: the masked image). In training the mask is drawn at random (data/masks.py).

    Options: ``latent_channels`` (c: the first stage's latent channels, the image's for pixel models) and the mask
    generator's ``min_fraction``, ``max_fraction``, ``full_fraction`` (all-masked share), ``brush_fraction``.
    """

    name = "inpaint"
    fields = ("image",)
    sample_fields = ("image", "mask")
    cacheable = False  # ℰ((1 − m)·x) changes with every random mask: it cannot be cached

    def __init__(self, latent_channels: int | None = None, min_fraction: float = 0.1, max_fraction: float = 0.6,
                 full_fraction: float = 0.1, brush_fraction: float = 0.5, **options):
        super().__init__(**options)
        if latent_channels is None:
            raise ConfigError("conditioning.concat_options.latent_channels is required for inpaint: the first "
                              "stage's latent channels (the image channels for a pixel-space model)")
        self.latent_channels = _positive_int("latent_channels", latent_channels)
        check_mask_options(min_fraction, max_fraction, full_fraction, brush_fraction)
        self.mask_options = {"min_fraction": float(min_fraction), "max_fraction": float(max_fraction),
                             "full_fraction": float(full_fraction), "brush_fraction": float(brush_fraction)}

    @property
    def channels(self) -> int:
        return 1 + self.latent_channels

    def options(self) -> dict:
        return {"latent_channels": self.latent_channels, **self.mask_options}

    def make(self, batch, *, encode=None, generator=None):
        return self.inputs(batch, encode=encode, generator=generator)["concat"]

    def inputs(self, batch, *, encode=None, generator=None, training=False):
        image = _image(self, batch, "image", None)
        b, _, h, w = image.shape
        if "mask" in batch:
            mask = self.field(batch, "mask")
            if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != b or tuple(mask.shape[-2:]) != (h, w):
                raise RequestError(f"mask must be ({b}, 1, {h}, {w}) (single-channel, the image's size), "
                                   f"got {tuple(mask.shape)}")
            if not mask.is_floating_point() or mask.min() < 0 or mask.max() > 1:
                raise RequestError("mask must be float in [0, 1] (1 = fill)")
        elif training:
            mask = random_masks(b, (h, w), generator=generator, **self.mask_options)
        else:
            raise RequestError("inpainting needs a mask (the field 'mask', 1 = fill)")
        mask = mask.to(device=image.device, dtype=image.dtype)
        masked = image * (1 - mask)  # the region to fill set to 0 (mid-grey in [-1, 1])
        z = encode(masked) if encode is not None else masked
        if z.shape[1] != self.latent_channels:
            raise ConfigError(f"inpaint: the masked image encodes to {z.shape[1]} channels but "
                              f"conditioning.concat_options.latent_channels is {self.latent_channels}")
        m = F.interpolate(mask, size=tuple(z.shape[-2:]), mode="area")  # share to fill per latent cell
        return {"concat": torch.cat([m, z.to(m.dtype)], dim=1)}

    def image_size(self, batch):
        x = batch.get("image")
        return tuple(x.shape[-2:]) if torch.is_tensor(x) else None
