"""Read a shapes image back into a segmentation map and a list of objects with boxes, without a network.

The shapes world paints each object in one of a few colours chosen pairwise far apart (data/shapes.py) on a known
background, with anti-aliased edges: a pixel is ``p = b + α·(c − b)``, the background b blended with the colour c
of the object that covers a share α of it. So the read-back is a per-pixel fit, then a per-object one:

1. Colour: for every palette colour c, the least-squares coverage α_c = <p − b, c − b> / |c − b|² (clipped to
   [0, 1]) and the residual |p − b − α_c·(c − b)|; the pixel takes the colour of the smallest residual and belongs
   to an object iff its α > 1/2 (the dataset's own rule: the object that covers most of the pixel). The
   background b is the configured background nearest to the image's median pixel.
2. Objects: the 8-connected components of each colour. A component under ``min_area`` pixels is noise and
   becomes background. Its box is its pixel extent; its shape is the one (circle, square, triangle) whose ideal
   mask drawn in that box (the dataset's inside-tests) has the highest IoU with the component.
3. Segmentation: each pixel of a component gets ``1 + class``, class = shape·num_colours + colour, as the
   dataset's ``segmentation`` field; everything else is 0.

On real images of the test split this reads the maps back at mIoU >= 0.95 (tests/test_tasks_metrics.py; the
figure for 32x32 and larger sizes is in docs/tasks.md). Generated images are read the same way, so the semantic
synthesis mIoU and the layout adherence measure the model, not a learned reader's biases.

    seg, objects = read_back(images, shapes_config)   # images (B, 3, H, W) in [-1, 1]
    objects[i] = [ReadObject(class_id, (x0, y0, x1, y1) in [0, 1], area), ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..data.shapes import BACKGROUNDS, COLOURS, ShapesConfig, object_mask

HALF = 0.53  # "more than half covered": the renderer's coverage comes in 16ths, and a tie at 1/2 is background
MIN_AREA = 4  # pixels: smaller components are noise (the smallest object of a 32x32 image covers ~17)


@dataclass(frozen=True)
class ReadObject:
    class_id: int                             # shape_index * num_colours + colour_index (the dataset's class id)
    box: tuple[float, float, float, float]    # (x0, y0, x1, y1) normalised pixel extent, x right, y down
    area: int                                 # pixels

    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def colour_map(image: np.ndarray, config: ShapesConfig) -> np.ndarray:
    """(H, W) int: −1 for background, else the index of the pixel's colour in ``config.colours`` (step 1)."""
    p = image.astype(np.float64)  # (H, W, 3) in 0..255
    median = np.median(p.reshape(-1, 3), axis=0)
    names = list(config.backgrounds)
    b = np.asarray(BACKGROUNDS[min(names, key=lambda n: np.sum((np.asarray(BACKGROUNDS[n]) - median) ** 2))],
                   dtype=np.float64)
    c = np.asarray([COLOURS[n] for n in config.colours], dtype=np.float64) - b  # (K, 3)
    d = p - b  # (H, W, 3)
    alpha = np.clip(d @ c.T / np.sum(c * c, axis=1), 0.0, 1.0)  # (H, W, K) least-squares coverage
    residual = np.sum((d[..., None, :] - alpha[..., None] * c) ** 2, axis=-1)  # (H, W, K)
    best = residual.argmin(-1)
    covered = np.take_along_axis(alpha, best[..., None], -1)[..., 0] > HALF
    return np.where(covered, best, -1)


def _shape_of(mask: np.ndarray, box: tuple[int, int, int, int], config: ShapesConfig) -> int:
    """Index in ``config.shapes`` of the shape that best explains the component ``mask`` (its pixel box ``box``).

    Every object fills a square box edge to edge (data/shapes.py), so each shape is fitted over a small grid of
    square boxes around the component's pixel extent (centre ±0.5 px, side +0..1 px: the extent of the pixels that
    are more than half covered is up to a pixel short), drawn as the dataset draws it (coverage on a 4x4
    supersampled grid, a pixel inside iff more than half covered); the best IoU over the grid scores the shape.
    """
    r0, r1, c0, c1 = box
    pad = 2
    padded = np.pad(mask, pad)
    rows = (np.arange(r0 - pad, r1 + pad, 0.25) + 0.125)[:, None]  # (4h, 1) sample y coordinates, in pixels
    cols = (np.arange(c0 - pad, c1 + pad, 0.25) + 0.125)[None, :]
    side0 = max(r1 - r0, c1 - c0)
    best = []
    for shape in config.shapes:
        score = 0.0
        for side in (side0, side0 + 0.5, side0 + 1.0):
            for dy in (-0.5, 0.0, 0.5):
                for dx in (-0.5, 0.0, 0.5):
                    cy, cx = (r0 + r1) / 2 + dy, (c0 + c1) / 2 + dx
                    inside = _inside(shape, cols - cx, rows - cy, side / 2)
                    cov = inside.reshape(padded.shape[0], 4, padded.shape[1], 4).mean(axis=(1, 3)) > 0.5
                    union = np.logical_or(cov, padded).sum()
                    score = max(score, np.logical_and(cov, padded).sum() / max(union, 1))
        best.append(score)
    return int(np.argmax(best))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """The dataset's inside-test of ``shape`` (data/shapes.py object_mask) for offsets from the centre, half
    extent ``h``."""
    return object_mask(_Centred(shape, h), dx, dy)


class _Centred:
    """A shape centred at the origin with half extent ``h``: what object_mask reads of an object (its ``shape``
    and ``geometry()``), for offsets from the centre."""

    def __init__(self, shape: str, h: float):
        self.shape, self.h = shape, h

    def geometry(self):
        return 0.0, 0.0, self.h


def read_image(image: np.ndarray, config: ShapesConfig, min_area: int = MIN_AREA) -> tuple[np.ndarray, list]:
    """One (H, W, 3) uint8 image -> (segmentation (H, W) int64, [ReadObject, ...] in reading order)."""
    height, width = image.shape[:2]
    colours = colour_map(image, config)
    seg = np.zeros((height, width), dtype=np.int64)
    objects = []
    eight = np.ones((3, 3), dtype=bool)
    for k in range(len(config.colours)):
        labels, count = ndimage.label(colours == k, structure=eight)
        for index, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            mask = labels[sl] == index
            area = int(mask.sum())
            if area < min_area:
                continue
            r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            shape = _shape_of(mask, (r0, r1, c0, c1), config)
            class_id = shape * len(config.colours) + k
            seg[sl][mask] = 1 + class_id
            objects.append(ReadObject(class_id, (c0 / width, r0 / height, c1 / width, r1 / height), area))
    objects.sort(key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))
    return seg, objects


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as a PNG of them would hold."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def read_back(images: torch.Tensor, config: ShapesConfig, min_area: int = MIN_AREA):
    """(B, 3, H, W) in [-1, 1] -> (segmentation (B, H, W) long, per image a list of ReadObjects)."""
    segs, objects = [], []
    for image in to_uint8(images):
        seg, objs = read_image(image, config, min_area)
        segs.append(torch.from_numpy(seg))
        objects.append(objs)
    return torch.stack(segs), objects
