"""Segmentation maps as PNG files: read a user's map, write the palette-coloured maps that the command shows.

A map holds one class id per pixel: 0 = background, 1 + c for object class c (the shapes world's
``segmentation`` field: c = shape·num_colours + colour). ``latentdiff sample --segmentation map.png`` reads

- a greyscale or 16-bit PNG (mode L / I): the pixel values are the class ids;
- a palette PNG (mode P), as :func:`write_map` writes: the palette indices are the class ids;
- an RGB(A) PNG whose colours are those of :func:`palette` (a map cut from a grid the command wrote): each
  colour maps back to its class; any other colour is an error that names it and where it is.

Class ids above the model's classes are refused where the map enters (the Segmentation condition's check).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.shapes import COLOURS, ShapesConfig
from .errors import MissingFileError, RequestError
from .fileio import atomic_write

SHADES = (1.0, 0.72, 0.46)  # per shape index: the colour's brightness (circle, square, triangle), all distinct


def palette(config: ShapesConfig) -> np.ndarray:
    """(1 + num_classes, 3) uint8: black background, then each class's colour at its shape's shade."""
    rows = [(0, 0, 0)]
    for c in range(config.num_classes):
        shape, colour = config.class_name(c)
        shade = SHADES[config.shapes.index(shape) % len(SHADES)]
        rows.append(tuple(int(round(v * shade)) for v in COLOURS[colour]))
    return np.asarray(rows, dtype=np.uint8)


def colourize(seg: torch.Tensor, config: ShapesConfig) -> torch.Tensor:
    """(…, H, W) class ids -> (…, 3, H, W) palette colours in [-1, 1] (for grids)."""
    pal = torch.from_numpy(palette(config)).float() / 127.5 - 1.0
    return pal[seg.long().clamp(0, len(pal) - 1)].movedim(-1, -3)


def write_map(path, seg: torch.Tensor, config: ShapesConfig) -> Path:
    """Write a (H, W) map as a palette PNG (indices = class ids), atomically."""
    from PIL import Image

    path = Path(path)
    img = Image.fromarray(seg.to(torch.uint8).cpu().numpy(), mode="P")
    img.putpalette(palette(config).reshape(-1).tolist())
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def read_map(path, config: ShapesConfig) -> torch.Tensor:
    """A map PNG (see the module docstring) -> (1, H, W) long class ids."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"segmentation map {path} not found")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"{path} is not a readable image: {e}") from None
    if img.mode in ("P", "L", "I", "I;16"):
        ids = np.asarray(img).astype(np.int64)
    elif img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB")).astype(np.int64)
        pal = palette(config).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        lookup = {int(k): i for i, k in enumerate(keys)}
        ids = np.full(code.shape, -1, dtype=np.int64)
        for value in np.unique(code):
            if int(value) in lookup:
                ids[code == value] = lookup[int(value)]
        if (ids < 0).any():
            r, c = np.argwhere(ids < 0)[0]
            raise RequestError(f"{path}: colour {tuple(int(v) for v in rgb[r, c])} at row {r}, column {c} is not a "
                               "class colour of this model's palette (give class ids as a greyscale or palette PNG)")
    else:
        raise RequestError(f"{path}: image mode {img.mode} is not a map; give class ids as a greyscale (L), 16-bit "
                           "or palette (P) PNG, or a palette-coloured RGB map")
    if ids.ndim != 2:
        raise RequestError(f"{path}: a map has one value per pixel, got shape {ids.shape}")
    return torch.from_numpy(ids)[None]
