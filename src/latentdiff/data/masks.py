"""Random inpainting masks: rectangles and free-form brush strokes, plus a share of all-masked images.

LDM trains its inpainting model on the masks of LaMa (Suvorov et al. 2022): thick free-form strokes and boxes
over a wide range of coverages; Stable Diffusion's inpainting model adds fully masked images so that it can also
generate freely. :func:`random_masks` draws such masks with the coverage (share of pixels to fill) uniform in
[``min_fraction``, ``max_fraction``], and all-masked ones with probability ``full_fraction``.

Convention: 1 = fill (the region to generate, white in a mask PNG), 0 = keep.

    masks = random_masks(64, (32, 32), generator=torch.Generator().manual_seed(0))   # (64, 1, 32, 32) in {0, 1}
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError


def check_mask_options(min_fraction: float, max_fraction: float, full_fraction: float, brush_fraction: float) -> None:
    """ConfigError naming the option unless 0 < min <= max <= 1 and the two shares lie in [0, 1]."""
    if not 0.0 < min_fraction <= max_fraction <= 1.0:
        raise ConfigError(f"masks: need 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
    for name, v in (("full_fraction", full_fraction), ("brush_fraction", brush_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"masks: {name} must lie in [0, 1], got {v}")


def rectangle_mask(rng: np.random.Generator, h: int, w: int, fraction: float, lo: float, hi: float) -> np.ndarray:
    """One axis-aligned box covering ``fraction`` of an (h, w) image (within [lo, hi] after rounding)."""
    area = fraction * h * w
    rh = int(rng.integers(max(1, math.ceil(area / w)), min(h, max(1, math.floor(area))) + 1))
    rw = min(w, max(1, round(area / rh)))
    while rh * rw > hi * h * w and rw > 1:  # rounding overshoot
        rw -= 1
    while rh * rw < lo * h * w and rw < w:  # rounding undershoot
        rw += 1
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    m = np.zeros((h, w), dtype=bool)
    m[y : y + rh, x : x + rw] = True
    return m


def brush_mask(rng: np.random.Generator, h: int, w: int, fraction: float, hi: float) -> np.ndarray:
    """Free-form strokes (a random walk of thick segments, as LaMa's and DeepFill v2's masks) painted until they
    cover ``fraction`` of the image; a dab that would pass ``hi`` is retried with a 1-pixel brush, then skipped."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), dtype=bool)
    side = min(h, w)
    target, limit = fraction * h * w, hi * h * w
    for _ in range(200):  # strokes
        radius = float(rng.uniform(max(0.7, side / 20), max(1.0, side / 8)))
        y, x = float(rng.uniform(0, h)), float(rng.uniform(0, w))
        angle = float(rng.uniform(0, 2 * math.pi))
        for _ in range(int(rng.integers(4, 12))):  # segments of one stroke
            angle += float(rng.normal(0, 0.8))
            length = float(rng.uniform(side / 8, side / 3))
            for s in np.linspace(0, length, max(2, int(length / max(radius / 2, 0.5)))):  # dabs along a segment
                cy = min(max(y + s * math.sin(angle), 0), h - 1)
                cx = min(max(x + s * math.cos(angle), 0), w - 1)
                for r in (radius, 0.7):
                    dab = m | ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
                    if dab.sum() <= limit:
                        m = dab
                        break
                if m.sum() >= target:
                    return m
            y, x = min(max(y + length * math.sin(angle), 0), h - 1), min(max(x + length * math.cos(angle), 0), w - 1)
    return m


def random_masks(n: int, size: tuple[int, int], *, generator: torch.Generator | None = None,
                 min_fraction: float = 0.1, max_fraction: float = 0.6, full_fraction: float = 0.1,
                 brush_fraction: float = 0.5) -> torch.Tensor:
    """(n, 1, H, W) float masks in {0, 1} (1 = fill): all ones with probability ``full_fraction``, else a box or
    (with probability ``brush_fraction``) brush strokes covering a share drawn uniformly in [min, max] of the
    pixels. Draws come from ``generator`` (None: torch's global RNG, which training checkpoints save)."""
    check_mask_options(min_fraction, max_fraction, full_fraction, brush_fraction)
    h, w = size
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 1, h, w), dtype=np.float32)
    for i in range(n):
        if rng.random() < full_fraction:
            out[i] = 1.0
            continue
        fraction = float(rng.uniform(min_fraction, max_fraction))
        if rng.random() < brush_fraction:
            m = brush_mask(rng, h, w, fraction, max_fraction)
            if m.mean() < min_fraction:  # a walk that could not reach the share (tiny images): a box instead
                m = rectangle_mask(rng, h, w, fraction, min_fraction, max_fraction)
        else:
            m = rectangle_mask(rng, h, w, fraction, min_fraction, max_fraction)
        out[i, 0] = m
    return torch.from_numpy(out)
