"""`shapes`: a procedural world of coloured shapes, generated from a seed and an index at any resolution.

Each image is a *scene*: one to a few objects (circle, square, triangle) in distinct cells of a 3x3 grid
(top left ... bottom right), each with a colour, a size and a position inside its cell, on a background.
Because the scene is known, every image comes with its ground truth:

- ``caption``: plain English, objects in reading order ("a red circle at the top left and a blue square
  in the centre");
- ``label``: class id ``shape * num_colours + colour`` for single-object images, -1 otherwise;
- ``boxes`` (K, 4) normalised ``x0, y0, x1, y1`` in [0, 1] with ``box_shape``, ``box_colour`` (-1 = padding);
  ``layout`` (K, 5) the same as rows ``[class, x0, y0, x1, y1]`` (class -1 = padding), a layout model's input;
- ``segmentation`` (H, W): 0 for background, ``1 + class`` where an object covers most of the pixel;
  ``instances`` (H, W): 0 for background, ``k + 1`` for the k-th object;
- ``cells`` (9,): per grid cell 0 (empty) or ``1 + class`` (the oracle's target, a layout descriptor).

Determinism: item ``index`` of split ``split`` with ``seed`` draws from its own numpy generator seeded by
(seed, split, index, attempt), so it depends on nothing else (not the batch, worker or order).

Split: a scene belongs to the test split iff a fixed hash of its *layout* (objects' cells, shapes, colours,
size levels and the background; not the sub-cell jitter) falls under ``test_fraction``. Draws are
rejected until they fall in the requested split, so no layout (hence no image) of the test split ever
appears in the train split, whatever the seeds, lengths or resolutions.

Rendering: objects are drawn by point sampling on an ``antialias`` x ``antialias`` supersampled grid and
box-filtered down, so edges are anti-aliased and every resolution shows the same scene.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError

SHAPES = ("circle", "square", "triangle")
# Colour name -> RGB (0..255). Chosen pairwise far apart so the oracle can read them back exactly.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (150, 70, 200),
    "orange": (245, 140, 30),
    "cyan": (60, 210, 220),
}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (100, 100, 100), "white": (255, 255, 255)}
GRID = 3  # the scene grid is GRID x GRID cells; position words below name its cells
POSITIONS = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the centre", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
SIZE_LEVELS = 8  # object extent = 0.55 .. 0.95 of a cell side in SIZE_LEVELS steps
JITTER_LEVELS = 9  # sub-cell positions per axis
SPLITS = ("train", "test")
SPLIT_BY = ("layout", "composition")


@dataclass
class ShapesConfig:
    size: int = 32                     # image side in pixels (any positive size; the scene does not depend on it)
    min_objects: int = 1               # objects per image, drawn uniformly in [min_objects, max_objects]
    max_objects: int = 3               # at most GRID*GRID = 9 (one object per cell); sets the K of "boxes"
    shapes: tuple = SHAPES             # shape names used (subset of SHAPES); class ids follow this order
    colours: tuple = tuple(COLOURS)    # colour names used (subset of COLOURS)
    backgrounds: tuple = ("black",)    # background names (subset of BACKGROUNDS); >1 adds "on a ... background"
    antialias: int = 4                 # supersampling factor per axis (1 = hard edges)
    test_fraction: float = 0.1         # share of layouts that belong to the test split
    split_by: str = "layout"           # what the split hashes: "layout" (objects with their sizes, and the
                                       # background) or "composition" (objects' shape, colour and cell only: no
                                       # caption of the test split ever occurs in the train split)
    mosaic: int = 1                    # n > 1: an item is a random size x size crop of an n x n mosaic of scenes,
                                       # each of side ``size`` (fields: image and segmentation only): a convolutional
                                       # model then sees objects away from the image border, as it does when it
                                       # runs on a larger canvas (LDM trains on crops of larger images)

    def __post_init__(self):
        self.shapes, self.colours, self.backgrounds = tuple(self.shapes), tuple(self.colours), tuple(self.backgrounds)
        for name in ("size", "min_objects", "max_objects", "antialias", "mosaic"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"shapes: {name} must be an int, got {v!r}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)):
            raise ConfigError(f"shapes: test_fraction must be a number, got {self.test_fraction!r}")
        if self.size < 1:
            raise ConfigError(f"shapes: size must be a positive int, got {self.size!r}")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ConfigError(f"shapes: need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                              f"got {self.min_objects}, {self.max_objects}")
        for kind, names, known in (("shape", self.shapes, SHAPES), ("colour", self.colours, COLOURS),
                                   ("background", self.backgrounds, BACKGROUNDS)):
            bad = [n for n in names if n not in known]
            if bad or not names or len(set(names)) != len(names):
                raise ConfigError(f"shapes: bad {kind} list {names!r}; choose distinct names from {', '.join(known)}")
        if self.mosaic < 1:
            raise ConfigError(f"shapes: mosaic must be an int >= 1, got {self.mosaic!r}")
        if not isinstance(self.antialias, int) or self.antialias < 1:
            raise ConfigError(f"shapes: antialias must be an int >= 1, got {self.antialias!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"shapes: test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.split_by not in SPLIT_BY:
            raise ConfigError(f"shapes: split_by must be one of {', '.join(SPLIT_BY)}, got {self.split_by!r}")

    @property
    def num_classes(self) -> int:
        """Number of single-object classes (shape x colour)."""
        return len(self.shapes) * len(self.colours)

    def class_id(self, shape: str, colour: str) -> int:
        return self.shapes.index(shape) * len(self.colours) + self.colours.index(colour)

    def class_name(self, class_id: int) -> tuple[str, str]:
        """(shape, colour) of a class id."""
        return self.shapes[class_id // len(self.colours)], self.colours[class_id % len(self.colours)]


@dataclass(frozen=True)
class ShapeObject:
    shape: str   # one of SHAPES
    colour: str  # one of COLOURS
    cell: int    # 0..8, reading order (row * GRID + column)
    size: int    # size level 0..SIZE_LEVELS-1
    jx: int      # sub-cell position levels 0..JITTER_LEVELS-1
    jy: int

    def geometry(self) -> tuple[float, float, float]:
        """(cx, cy, h): centre and half extent in normalised image coordinates (x right, y down, [0, 1])."""
        c = 1.0 / GRID
        extent = c * (0.55 + 0.40 * self.size / (SIZE_LEVELS - 1))
        margin = c - extent
        row, col = divmod(self.cell, GRID)
        x0 = col * c + margin * self.jx / (JITTER_LEVELS - 1)
        y0 = row * c + margin * self.jy / (JITTER_LEVELS - 1)
        return x0 + extent / 2, y0 + extent / 2, extent / 2

    def box(self) -> tuple[float, float, float, float]:
        """Tight bounding box (x0, y0, x1, y1) in normalised coordinates; every shape fills it edge to edge."""
        cx, cy, h = self.geometry()
        return cx - h, cy - h, cx + h, cy + h


@dataclass(frozen=True)
class Scene:
    objects: tuple  # ShapeObjects sorted by cell (reading order)
    background: str

    def layout_key(self) -> str:
        """What defines the split: everything but the sub-cell jitter."""
        objs = ";".join(f"{o.cell}:{o.shape}:{o.colour}:{o.size}" for o in self.objects)
        return f"{self.background}|{objs}"

    def composition_key(self) -> str:
        """What a caption says: each object's shape, colour and cell (not sizes, positions in the cell, background)."""
        return ";".join(f"{o.cell}:{o.shape}:{o.colour}" for o in self.objects)


def scene_split(scene: Scene, test_fraction: float, by: str = "layout") -> str:
    """"test" or "train": a fixed hash of the scene's layout (or composition), independent of seeds and resolutions."""
    key = scene.layout_key() if by == "layout" else "composition|" + scene.composition_key()
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"ld-shapes").digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    return "test" if u < test_fraction else "train"


def draw_scene(rng: np.random.Generator, cfg: ShapesConfig) -> Scene:
    """One random scene: a number of objects in distinct cells, each with shape, colour, size and jitter."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = np.sort(rng.choice(GRID * GRID, size=n, replace=False))
    attrs = rng.integers(0, [len(cfg.shapes), len(cfg.colours), SIZE_LEVELS, JITTER_LEVELS, JITTER_LEVELS], size=(n, 5))
    objects = tuple(
        ShapeObject(cfg.shapes[a[0]], cfg.colours[a[1]], int(cell), int(a[2]), int(a[3]), int(a[4]))
        for cell, a in zip(cells, attrs)
    )
    background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    return Scene(objects, background)


def scene_at(seed: int, index: int, split: str, cfg: ShapesConfig) -> Scene:
    """The scene of item ``index``: deterministic in (seed, split, index) and always in ``split``."""
    if split not in SPLITS:
        raise ConfigError(f"shapes: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    for _ in range(10_000):
        scene = draw_scene(rng, cfg)
        if scene_split(scene, cfg.test_fraction, cfg.split_by) == split:
            return scene
    raise RuntimeError(f"shapes: no {split} scene found for index {index}; is the configuration too small?")


def object_mask(obj: ShapeObject, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of the object at sample points (u: x coordinates (1, S), v: y coordinates (S, 1))."""
    cx, cy, h = obj.geometry()
    dx, dy = u - cx, v - cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        # Upright isosceles triangle: apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h).
        # Inside iff below the base line and within both slanted edges: |dx| <= (dy + h) / 2.
        return (dy <= h) & (2 * np.abs(dx) <= dy + h)
    raise ValueError(f"shapes: unknown shape {obj.shape!r}")


def render_scene(scene: Scene, size: int, antialias: int = 4):
    """Render a scene.

    Returns (image uint8 (H, W, 3), coverage float32 (K, H, W) of each object after occlusion by later ones).
    Each object is sampled only inside the pixel rectangle of its box (it cannot cover anything outside).
    """
    s = size * antialias
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = bg
    coverage = np.zeros((len(scene.objects), size, size), dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        c0, r0, c1, r1 = pixel_box(obj.box(), size)
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, size), min(r1, size)
        if c1 <= c0 or r1 <= r0:
            continue
        u = (np.arange(c0 * antialias, c1 * antialias) + 0.5)[None, :] / s  # (1, w*aa) sample x coordinates
        v = (np.arange(r0 * antialias, r1 * antialias) + 0.5)[:, None] / s  # (h*aa, 1) sample y coordinates
        m = object_mask(obj, u, v).astype(np.float32)
        cov = m.reshape(r1 - r0, antialias, c1 - c0, antialias).mean(axis=(1, 3))  # (h, w) box filter
        coverage[:k, r0:r1, c0:c1] *= 1.0 - cov  # later objects occlude earlier ones (distinct cells: no-op)
        coverage[k, r0:r1, c0:c1] = cov
        win = img[r0:r1, c0:c1]
        win += cov[..., None] * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - win)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), coverage


def caption(scene: Scene, with_background: bool = False) -> str:
    """Plain English: 'a red circle at the top left, a green square in the centre and a blue triangle ...'."""
    parts = [f"a {o.colour} {o.shape} {POSITIONS[o.cell]}" for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + (f" on a {scene.background} background" if with_background else "")


def scene_targets(scene: Scene, cfg: ShapesConfig) -> dict:
    """Label, per-cell targets and padded boxes of a scene (tensors ready to collate)."""
    K = cfg.max_objects
    boxes = np.zeros((K, 4), dtype=np.float32)
    box_shape = np.full(K, -1, dtype=np.int64)
    box_colour = np.full(K, -1, dtype=np.int64)
    cells = np.zeros(GRID * GRID, dtype=np.int64)
    for k, o in enumerate(scene.objects):
        boxes[k] = o.box()
        box_shape[k] = cfg.shapes.index(o.shape)
        box_colour[k] = cfg.colours.index(o.colour)
        cells[o.cell] = 1 + cfg.class_id(o.shape, o.colour)
    label = cfg.class_id(scene.objects[0].shape, scene.objects[0].colour) if len(scene.objects) == 1 else -1
    classes = np.where(box_shape >= 0, box_shape * len(cfg.colours) + box_colour, -1).astype(np.float32)
    layout = np.concatenate([classes[:, None], boxes], axis=1)  # (K, 5): [class, x0, y0, x1, y1]
    return {"label": label, "cells": torch.from_numpy(cells), "boxes": torch.from_numpy(boxes),
            "layout": torch.from_numpy(layout),
            "box_shape": torch.from_numpy(box_shape), "box_colour": torch.from_numpy(box_colour),
            "num_objects": len(scene.objects)}


class ShapesDataset(Dataset):
    """Map-style dataset of ``length`` shapes images of one split, generated on the fly.

    Item keys: image (3, H, W) float32 in [-1, 1], caption, label, cells, boxes, box_shape, box_colour, layout,
    num_objects, segmentation (H, W) long, instances (H, W) long. See the module docstring.

    Args:
        split: "train" or "test"; their layouts never overlap.
        length: number of items (any; the world is procedural).
        seed: base seed; item i depends only on (seed, split, i).
        config: a ShapesConfig; keyword ``overrides`` replace its fields (unknown names are errors).
    """

    def __init__(self, split: str = "train", length: int = 50_000, seed: int = 0, config: ShapesConfig | None = None,
                 **overrides):
        if split not in SPLITS:
            raise ConfigError(f"shapes: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if length < 1:
            raise ConfigError(f"shapes: length must be >= 1, got {length}")
        known = {f.name for f in fields(ShapesConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"shapes: unknown config keys {unknown}; known: {sorted(known)}")
        base = config or ShapesConfig()
        self.config = ShapesConfig(**{**{f.name: getattr(base, f.name) for f in fields(ShapesConfig)}, **overrides})
        self.split, self.length, self.seed = split, int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes: index {index} out of range for length {self.length}")
        return scene_at(self.seed, index, self.split, self.config)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` without rendering it."""
        return caption(self.scene(index), with_background=len(self.config.backgrounds) > 1)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if self.config.mosaic > 1:
            return self._mosaic_item(index)
        scene = self.scene(index)
        cfg = self.config
        pixels, segmentation, instances = _render_maps(scene, cfg)
        item = scene_targets(scene, cfg)
        item.update(
            image=torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0,  # (3, H, W)
            caption=caption(scene, with_background=len(cfg.backgrounds) > 1),
            segmentation=torch.from_numpy(segmentation),
            instances=torch.from_numpy(instances),
        )
        return item

    def _mosaic_item(self, index: int) -> dict:
        """Item ``index`` of a mosaic dataset: scenes n²·index ... n²·index + n² − 1 of the split laid out n x n,
        cropped at an offset drawn from (seed, split, index); image and segmentation only (a crop cuts objects, so
        it has no caption, boxes or layout)."""
        if not 0 <= index < self.length:
            raise IndexError(f"shapes: index {index} out of range for length {self.length}")
        cfg, n, size = self.config, self.config.mosaic, self.config.size
        pixels = np.zeros((n * size, n * size, 3), dtype=np.uint8)
        segmentation = np.zeros((n * size, n * size), dtype=np.int64)
        for k in range(n * n):
            r, c = divmod(k, n)
            tile = scene_at(self.seed, n * n * index + k, self.split, cfg)
            rows, cols = slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size)
            pixels[rows, cols], segmentation[rows, cols], _ = _render_maps(tile, cfg)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index, n])
        y, x = (int(v) for v in rng.integers(0, (n - 1) * size + 1, size=2))
        crop = pixels[y:y + size, x:x + size]
        return {"image": torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 127.5 - 1.0,
                "segmentation": torch.from_numpy(np.ascontiguousarray(segmentation[y:y + size, x:x + size]))}


def _render_maps(scene: Scene, cfg: ShapesConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixels (H, W, 3) uint8, segmentation (H, W) int64, instances (H, W) int64) of a scene at ``cfg.size``.
    Segmentation: the object that covers the largest share of the pixel, background if that is larger."""
    pixels, coverage = render_scene(scene, cfg.size, cfg.antialias)
    share = np.concatenate([1.0 - coverage.sum(0, keepdims=True), coverage], axis=0)  # (1 + K, H, W)
    instances = share.argmax(0)  # 0 = background, k + 1 = object k
    lut = np.array([0] + [1 + cfg.class_id(o.shape, o.colour) for o in scene.objects], dtype=np.int64)
    return pixels, lut[instances], instances.astype(np.int64)


def pixel_box(box, size: int) -> tuple[int, int, int, int]:
    """Smallest pixel rectangle [c0, c1) x [r0, r1) that contains a normalised box, as (c0, r0, c1, r1)."""
    x0, y0, x1, y1 = (float(b) for b in box)
    return int(np.floor(x0 * size)), int(np.floor(y0 * size)), int(np.ceil(x1 * size)), int(np.ceil(y1 * size))
