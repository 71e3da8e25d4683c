"""Super-resolution of inputs larger than the training size in overlapping tiles, blended at their seams.

The U-Net and the first stage are convolutional, so a larger low-resolution image can be upscaled whole (the
default of ``Pipeline.sample``); but their attention layers and the autoencoder's middle block then see grids
larger than in training. Tiling keeps every network call at the training size: the low-resolution image is cut
into ``tile`` x ``tile`` crops overlapping by ``overlap`` pixels, each crop is upscaled (all in one batch), and the
outputs are blended with weights that ramp linearly across each overlap (a separable window, > 0 everywhere), so
no seam is a hard edge.

    high = upscale_tiled(pipe, low, seed=0)      # low (1, C, h, w) in [-1, 1] -> (1, C, h·f, w·f)
"""

from __future__ import annotations

import torch

from .errors import RequestError


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along one side: every ``stride``, the last one flush with the end."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def ramp(size: int, overlap: int) -> torch.Tensor:
    """(size,) weights: 1 inside, a linear ramp 1/(overlap+1) .. overlap/(overlap+1) over each overlap."""
    w = torch.ones(size)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = r
        w[size - overlap :] = r.flip(0)
    return w


@torch.no_grad()
def upscale_tiled(pipe, low: torch.Tensor, *, tile: int | None = None, overlap: int | None = None, seed: int = 0,
                  **sample_options) -> torch.Tensor:
    """``low`` (1, C, h, w) upscaled by the model's factor in tiles of its training size (``tile``: low-resolution
    pixels, default data.size / factor; ``overlap`` default tile / 2); tile k draws with seed + k."""
    if pipe.spatial is None or pipe.spatial.name != "low_res":
        raise RequestError("tiled upscaling is for super-resolution models (conditioning.concat: low_res)")
    f = pipe.spatial.factor
    tile = tile or pipe.config.data.size // f
    overlap = tile // 2 if overlap is None else overlap
    if low.dim() != 4 or len(low) != 1:
        raise RequestError(f"upscale_tiled takes one image (1, C, h, w), got {tuple(low.shape)}")
    h, w = low.shape[-2:]
    if h < tile or w < tile or not 0 <= overlap < tile:
        raise RequestError(f"tiles of {tile}x{tile} with overlap {overlap} do not fit a {h}x{w} input")
    ys, xs = tile_starts(h, tile, tile - overlap), tile_starts(w, tile, tile - overlap)
    crops = torch.cat([low[..., y : y + tile, x : x + tile] for y in ys for x in xs])
    out = pipe.sample(len(crops), conditions={"low_res": crops}, seed=seed, output="tensor", **sample_options)
    big, lap = tile * f, overlap * f
    window = ramp(big, lap)[:, None] * ramp(big, lap)[None, :]  # (big, big)
    acc = torch.zeros(out.shape[1], h * f, w * f)
    weight = torch.zeros(1, h * f, w * f)
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        acc[:, y * f : y * f + big, x * f : x * f + big] += out[k] * window
        weight[:, y * f : y * f + big, x * f : x * f + big] += window
    return (acc / weight)[None].clamp(-1, 1)
