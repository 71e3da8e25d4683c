"""Image transforms shared by the datasets: PIL at the edge, (C, H, W) float32 tensors in [-1, 1] after.

Random transforms take an explicit ``torch.Generator``; :func:`item_generator` seeds one per
(seed, epoch, index), so an item's augmentation depends on nothing but those three numbers and a resumed run
sees exactly the crops and flips it would have seen without the interruption.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

# Channel count -> PIL mode of the converted image.
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

# Source modes we know how to read. 16-bit greyscale is rescaled to 8 bits first (a plain PIL convert would
# clip every value above 255 to white). Others (e.g. "F", "LAB") have no unambiguous 8-bit meaning.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_KNOWN_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"}
_KNOWN_MODES |= _SIXTEEN_BIT_MODES
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


def check_channels(channels: int) -> int:
    """Validate a requested channel count (1 greyscale, 3 RGB, 4 RGBA)."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_MODES)}, got {channels!r}")
    return channels


def convertible(mode: str, channels: int) -> bool:
    """Whether an image of PIL ``mode`` can be converted to ``channels`` channels by :func:`convert_channels`."""
    return mode in _KNOWN_MODES and channels in CHANNEL_MODES


def convert_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert a PIL image to 1 (L), 3 (RGB) or 4 (RGBA) channels.

    Transparent images converted to 1 or 3 channels are composited onto white (dropping the alpha band
    would expose whatever colour the transparent pixels happen to hold, often black). 16-bit greyscale is
    scaled to 8 bits (value >> 8). Raises ValueError for modes without an 8-bit meaning.
    """
    target = CHANNEL_MODES[check_channels(channels)]
    if not convertible(img.mode, channels):
        raise DataError(f"cannot convert an image of mode {img.mode!r} to {channels} channel(s)")
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.int64)
        img = Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8), mode="L")
    if img.mode == target:
        return img
    has_alpha = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    if has_alpha and target != "RGBA":
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(target)


def _size_hw(size) -> tuple[int, int]:
    """An int size means square; a pair is (height, width)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (int(s) for s in size)
    else:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def resize_to_cover(img: Image.Image, size) -> Image.Image:
    """Resize keeping the aspect ratio so the image just covers ``size`` (shorter side = size for squares).

    Bicubic with PIL's area-aware support, so large downscales are antialiased.
    """
    h, w = _size_hw(size)
    scale = max(h / img.height, w / img.width)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) == img.size:
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def crop_box(img_size: tuple[int, int], size, mode: str = "center", generator: torch.Generator | None = None):
    """(left, top, right, bottom) of a ``size`` crop inside an image of PIL size (width, height)."""
    h, w = _size_hw(size)
    W, H = img_size
    if H < h or W < w:
        raise ValueError(f"image of size {W}x{H} is smaller than the crop {w}x{h}")
    if mode == "center":
        top, left = (H - h) // 2, (W - w) // 2
    elif mode == "random":
        if generator is None:
            raise ValueError("a random crop needs a torch.Generator")
        top = int(torch.randint(0, H - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - w + 1, (1,), generator=generator))
    else:
        raise ValueError(f"unknown crop {mode!r}; expected 'center' or 'random'")
    return left, top, left + w, top + h


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (uint8, L/RGB/RGBA) -> (C, H, W) float32 in [-1, 1]: x / 127.5 - 1."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W, 1)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)
    return x.to(torch.float32) / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [-1, 1] -> PIL image (values clamped, rounded to uint8)."""
    if x.ndim != 3 or x.shape[0] not in CHANNEL_MODES:
        raise ValueError(f"expected a (C, H, W) tensor with C in {sorted(CHANNEL_MODES)}, got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()  # (H, W, C)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr, mode=CHANNEL_MODES[arr.shape[2]])


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index) through numpy's SeedSequence (well mixed, stable)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip a (C, H, W) tensor left-right with probability p (one draw from ``generator``)."""
    if float(torch.rand((), generator=generator)) < p:
        return x.flip(-1)
    return x
