"""Layouts of the shapes world: a user's list of boxes -> the (N, K, 5) tensor a layout model takes, and back.

A layout is a JSON list of objects, each ``{"shape": "circle", "colour": "red", "box": [x0, y0, x1, y1]}`` with the
box in [0, 1] (x to the right, y down, x0 < x1, y0 < y1), at most the model's ``max_objects`` of them; a list of
such lists is several layouts (cycled over the samples, like prompts). The same lists work from Python:

    pipe.sample(4, layouts=[{"shape": "circle", "colour": "red", "box": [0.1, 0.1, 0.4, 0.4]}])
    latentdiff sample MODEL --layout layout.json

The tensor has one row per object, ``[class, x0, y0, x1, y1]`` with class = shape·num_colours + colour (the
dataset's class id, data/shapes.py) and class −1 in the empty slots; the layout encoder (nn/layout_encoder.py)
turns it into box tokens. Every check is here, where a layout enters; each error names the object and the key.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .data.shapes import COLOURS, SHAPES, ShapesConfig, ShapesDataset, object_mask
from .errors import ConfigError, MissingFileError, RequestError
from .fileio import read_json

KEYS = ("shape", "colour", "box")


def shapes_config(data) -> ShapesConfig:
    """The ShapesConfig (class names and their order) of a run's ``data`` section; a ConfigError unless shapes.
    Whole scenes: a ``mosaic`` option (how training items were cropped) is not part of the world it describes."""
    if data.name != "shapes":
        raise ConfigError(f"layouts name shapes and colours of the shapes world; this model was trained on "
                          f"{data.name!r}")
    known = {f.name for f in fields(ShapesConfig)} - {"mosaic"}
    return ShapesConfig(**{k: v for k, v in (data.options or {}).items() if k in known})


def parse_layout(objects, config: ShapesConfig, max_objects: int, where: str = "layout") -> torch.Tensor:
    """One layout (a list of object dicts) -> (max_objects, 5) float; a RequestError naming the bad entry."""
    if not isinstance(objects, (list, tuple)):
        raise RequestError(f"{where} must be a list of objects {{\"shape\", \"colour\", \"box\"}}, "
                           f"got {type(objects).__name__}")
    if not objects:
        raise RequestError(f"{where} has no object; give 1..{max_objects}")
    if len(objects) > max_objects:
        raise RequestError(f"{where} has {len(objects)} objects; this model takes at most {max_objects}")
    out = torch.full((max_objects, 5), -1.0)
    out[:, 1:] = 0.0
    for k, obj in enumerate(objects):
        at = f"{where}[{k}]"
        if not isinstance(obj, dict):
            raise RequestError(f"{at} must be an object {{\"shape\", \"colour\", \"box\"}}, got {type(obj).__name__}")
        missing, extra = [n for n in KEYS if n not in obj], sorted(set(obj) - set(KEYS))
        if missing or extra:
            raise RequestError(f"{at}: " + (f"missing key(s) {missing}" if missing else f"unknown key(s) {extra}")
                               + f"; an object has exactly {list(KEYS)}")
        shape, colour, box = obj["shape"], obj["colour"], obj["box"]
        if shape not in config.shapes:
            raise RequestError(f"{at}.shape: unknown shape {shape!r}; this model knows {', '.join(config.shapes)}")
        if colour not in config.colours:
            raise RequestError(f"{at}.colour: unknown colour {colour!r}; this model knows "
                               f"{', '.join(config.colours)}")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise RequestError(f"{at}.box must be 4 numbers [x0, y0, x1, y1] in [0, 1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise RequestError(f"{at}.box {list(box)} lies outside [0, 1] (coordinates are fractions of the image)")
        if not (x0 < x1 and y0 < y1):
            raise RequestError(f"{at}.box {list(box)} needs x0 < x1 and y0 < y1 ([x0, y0, x1, y1], y down)")
        out[k] = torch.tensor([config.class_id(shape, colour), x0, y0, x1, y1])
    return out


def parse_layouts(value, config: ShapesConfig, max_objects: int, where: str = "layout") -> torch.Tensor:
    """One layout or a list of layouts (or a (N, K, 5) tensor, checked) -> (N, max_objects, 5) float."""
    if torch.is_tensor(value):
        return _checked_tensor(value, config, max_objects)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return torch.stack([parse_layout(v, config, max_objects, f"{where}[{i}]") for i, v in enumerate(value)])
    return parse_layout(value, config, max_objects, where)[None]


def _checked_tensor(t: torch.Tensor, config: ShapesConfig, max_objects: int) -> torch.Tensor:
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[-1] != 5 or t.shape[1] > max_objects or not t.is_floating_point():
        raise RequestError(f"a layout tensor must be (N, K <= {max_objects}, 5) float [class, x0, y0, x1, y1], "
                           f"got {tuple(t.shape)} {t.dtype}")
    cls, box = t[..., 0], t[..., 1:]
    present = cls >= 0
    if ((cls != cls.round()) | (cls < -1) | (cls >= config.num_classes)).any():
        raise RequestError(f"layout classes must be -1 (empty) or 0..{config.num_classes - 1}")
    ok = (box >= 0).all(-1) & (box <= 1).all(-1) & (box[..., 0] < box[..., 2]) & (box[..., 1] < box[..., 3])
    if (present & ~ok).any():
        raise RequestError("layout boxes must lie in [0, 1] with x0 < x1 and y0 < y1")
    if t.shape[1] < max_objects:
        pad = torch.full((t.shape[0], max_objects - t.shape[1], 5), -1.0, dtype=t.dtype)
        pad[..., 1:] = 0.0
        t = torch.cat([t, pad], dim=1)
    return t


def read_layout_file(path, config: ShapesConfig, max_objects: int) -> torch.Tensor:
    """A JSON layout file (one layout or a list of layouts) -> (N, max_objects, 5)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"layout file {path} not found")
    value = read_json(path, RequestError, expect=None)  # parse_layouts names what is wrong with the value
    return parse_layouts(value, config, max_objects, where=str(path))


def to_objects(layout: torch.Tensor, config: ShapesConfig) -> list[dict]:
    """(K, 5) -> the JSON list of objects (the empty slots left out)."""
    out = []
    for cls, *box in layout.tolist():
        if cls >= 0:
            shape, colour = config.class_name(int(round(cls)))
            out.append({"shape": shape, "colour": colour, "box": [round(v, 4) for v in box]})
    return out


def heldout_layouts(num: int, *, seed: int = 0, min_objects: int = 2, max_objects: int = 3,
                    config: ShapesConfig | None = None) -> torch.Tensor:
    """(num, max_objects, 5) layouts of the test split (never seen in training) with min..max objects each."""
    base = config or ShapesConfig()
    ds = ShapesDataset("test", 10 * num + 100, seed=seed, config=base, size=8, min_objects=min_objects,
                       max_objects=max_objects)
    return torch.stack([torch.from_numpy(_layout_of(ds.scene(i), ds.config)) for i in range(num)])


def _layout_of(scene, config: ShapesConfig) -> np.ndarray:
    out = np.full((config.max_objects, 5), -1.0, dtype=np.float32)
    out[:, 1:] = 0.0
    for k, o in enumerate(scene.objects):
        out[k] = [config.class_id(o.shape, o.colour), *o.box()]
    return out


def tile_layouts(layouts: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A (rows·cols, K, 5) stack of layouts -> one (rows·cols·K, 5) layout of the tiles side by side, boxes scaled
    into their tile (a layout for a rows·H x cols·W image with objects of the training scale)."""
    out = []
    for i, lay in enumerate(layouts):
        r, c = divmod(i, cols)
        for cls, x0, y0, x1, y1 in lay.tolist():
            if cls >= 0:
                out.append([cls, (c + x0) / cols, (r + y0) / rows, (c + x1) / cols, (r + y1) / rows])
    return torch.tensor(out, dtype=torch.float32)


def draw_layout(layout: torch.Tensor, height: int, width: int, config: ShapesConfig) -> torch.Tensor:
    """A picture of a (K, 5) layout for grids: each box outlined in its colour with its shape drawn faintly inside;
    (3, height, width) in [-1, 1]."""
    img = np.zeros((height, width, 3), dtype=np.float32)
    for cls, *box in layout.tolist():
        if cls < 0:
            continue
        shape, colour = config.class_name(int(round(cls)))
        rgb = np.asarray(COLOURS[colour], dtype=np.float32)
        c0, r0 = int(box[0] * width), int(box[1] * height)
        c1, r1 = max(c0 + 1, int(np.ceil(box[2] * width))), max(r0 + 1, int(np.ceil(box[3] * height)))
        c1, r1 = min(c1, width), min(r1, height)
        v = (np.arange(r0, r1) + 0.5)[:, None] / height
        u = (np.arange(c0, c1) + 0.5)[None, :] / width
        inside = object_mask(_BoxObject(shape, box), u, v)
        img[r0:r1, c0:c1][inside] = 0.45 * rgb
        img[r0, c0:c1] = img[r1 - 1, c0:c1] = rgb
        img[r0:r1, c0] = img[r0:r1, c1 - 1] = rgb
    return torch.from_numpy(img).permute(2, 0, 1) / 127.5 - 1.0


class _BoxObject:
    """The geometry of an object drawn in a box (object_mask's interface; boxes of a layout need not be square)."""

    def __init__(self, shape: str, box):
        self.shape, self.box = shape, box

    def geometry(self):
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2


__all__ = ["SHAPES", "COLOURS", "draw_layout", "heldout_layouts", "parse_layout", "parse_layouts",
           "read_layout_file", "shapes_config", "tile_layouts", "to_objects"]
