"""Prompt adherence on the shapes world, GenEval-style (Ghosh et al. 2023): does an image show what its prompt asks?

GenEval detects the objects of a generated image and checks them against the prompt (object, count,
colour, position). Here the scene grammar is fixed, so the check is exact: the shapes oracle
(eval/shapes_oracle.py) reads every cell of the 3x3 grid back (0 = empty, 1 + class), and an image passes
only if all nine cells equal the prompt's: each object's shape, colour and cell, and no extra object.

- ``parse_caption``: a prompt in the shapes grammar ("a red circle at the top left and a blue square in the
  centre", optionally "... on a grey background") -> per-cell targets (9,), the inverse of
  ``data.shapes.caption``; ``cells_caption`` goes back.
- ``heldout_prompts``: prompts from the *test* split of shapes, whose layouts (objects with their sizes)
  never occur in training, balanced over object counts; ``real_images`` renders the real test image of
  each, whose score is the oracle's ceiling. (The split is by layout, not by prompt: the same prompt with
  other sizes can be a training layout, so a test prompt's *text* may have been seen in training.)
- ``score`` -> passes (N,), ``adherence_report`` -> rate and count per tag and overall,
  ``format_adherence`` -> a table beside the real images' ceiling, ``evaluate_adherence`` does all of it
  for a ``generate(prompts, seeds)`` callable.

The background phrase, the objects' sizes and their sub-cell positions are not scored: the oracle reads
neither, and the prompt grammar names no size.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..data.shapes import (
    GRID,
    JITTER_LEVELS,
    POSITIONS,
    SIZE_LEVELS,
    Scene,
    ShapesConfig,
    caption,
    render_scene,
    scene_at,
    scene_targets,
)
from .features import quantize_8bit

COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OVERALL = "overall"
_BACKGROUND = re.compile(r"^(?P<objects>.*?)\s+on an? (?P<background>\S+) background$")
_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_OBJECT = re.compile(r"^an? (?P<colour>\S+) (?P<shape>\S+) (?P<position>.+)$")


def count_tag(num_objects: int) -> str:
    """"one object", "two objects", ... (the GenEval-style tag of a prompt with that many objects)."""
    if not 1 <= num_objects <= len(COUNT_WORDS):
        raise ValueError(f"adherence: a shapes prompt has 1 to {len(COUNT_WORDS)} objects, got {num_objects}")
    return f"{COUNT_WORDS[num_objects - 1]} object{'s' if num_objects > 1 else ''}"


# ---------------------------------------------------------------------------------------------- prompt grammar

def parse_objects(text: str, config: ShapesConfig) -> tuple[list[tuple[str, str, int]], str | None]:
    """([(shape, colour, cell)] in the prompt's order, background name or None) of a shapes-grammar prompt.

    Case, surrounding spaces and a final full stop are ignored; "a" and "an" are both accepted. Objects are
    separated by ", " or " and " (the dataset writes "A, B and C"). Raises ValueError naming the part that
    does not parse, a shape, colour or background that ``config`` does not use, or two objects in one cell.
    """
    if not isinstance(text, str):
        raise TypeError(f"adherence: a prompt must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split()).rstrip(".").strip()
    if not norm:
        raise ValueError("adherence: the prompt is empty; expected e.g. 'a red circle at the top left'")
    background = None
    m = _BACKGROUND.match(norm)
    if m:
        norm, background = m["objects"], m["background"]
        if background not in config.backgrounds:
            raise ValueError(f"adherence: unknown background {background!r} in prompt {text!r}; this shapes "
                             f"configuration uses {', '.join(config.backgrounds)}")
    objects, used = [], {}
    for part in _SEPARATOR.split(norm):
        o = _OBJECT.match(part)
        if o is None:
            raise ValueError(f"adherence: cannot parse {part!r} in prompt {text!r}; each object reads "
                             "'a <colour> <shape> <position>', e.g. 'a red circle at the top left'")
        colour, shape, position = o["colour"], o["shape"], o["position"]
        if colour not in config.colours:
            raise ValueError(f"adherence: unknown colour {colour!r} in {part!r}; expected one of "
                             f"{', '.join(config.colours)}")
        if shape not in config.shapes:
            raise ValueError(f"adherence: unknown shape {shape!r} in {part!r}; expected one of "
                             f"{', '.join(config.shapes)}")
        if position not in POSITIONS:
            raise ValueError(f"adherence: unknown position {position!r} in {part!r}; expected one of "
                             f"{', '.join(map(repr, POSITIONS))}")
        cell = POSITIONS.index(position)
        if cell in used:
            raise ValueError(f"adherence: {used[cell]!r} and {part!r} in prompt {text!r} share the cell "
                             f"{position!r}; a shapes scene has at most one object per cell")
        used[cell] = part
        objects.append((shape, colour, cell))
    return objects, background


def parse_caption(text: str, config: ShapesConfig) -> torch.Tensor:
    """Per-cell targets (9,) long of a shapes-grammar prompt: 0 empty, 1 + ``config.class_id(shape, colour)``.

    The inverse of ``data.shapes.caption`` (the background phrase is accepted and not scored): for every
    scene, ``parse_caption(caption(scene), cfg)`` equals ``scene_targets(scene, cfg)["cells"]``.
    """
    cells = torch.zeros(GRID * GRID, dtype=torch.long)
    for shape, colour, cell in parse_objects(text, config)[0]:
        cells[cell] = 1 + config.class_id(shape, colour)
    return cells


def cells_caption(cells, config: ShapesConfig) -> str:
    """The prompt of per-cell targets (9,), in the dataset's wording ("" when every cell is empty)."""
    values = [int(v) for v in torch.as_tensor(cells).reshape(-1).tolist()]
    if len(values) != GRID * GRID or not all(0 <= v <= config.num_classes for v in values):
        raise ValueError(f"adherence: cells must be {GRID * GRID} values in [0, {config.num_classes}], got {values}")
    parts = []
    for cell, v in enumerate(values):
        if v:
            shape, colour = config.class_name(v - 1)
            parts.append(f"a {colour} {shape} {POSITIONS[cell]}")
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


# ---------------------------------------------------------------------------------------------- held-out prompts

@dataclass(frozen=True)
class PromptCase:
    prompt: str                 # the scene's caption (with the background phrase when the world has several)
    cells: torch.Tensor         # (9,) long targets: 0 empty, 1 + class
    num_objects: int
    tag: str                    # "one object", "two objects", ...
    scene: Scene = field(repr=False)          # the test-split scene the prompt describes (its real image)
    config: ShapesConfig = field(repr=False)  # the world it was drawn from (size, classes, antialias)


def heldout_prompts(num: int, *, seed: int = 0, min_objects: int = 1, max_objects: int = 3, size: int = 32,
                    unique: bool = True, **shapes_options) -> list[PromptCase]:
    """``num`` prompts drawn from the test split of the shapes world: layouts never seen in training.

    The object counts min_objects..max_objects share ``num`` as evenly as possible (the first counts get the
    remainder), listed by count. The cases of count n are the test-split items 0, 1, ... of a world with
    exactly n objects per scene and ``seed``, skipping a prompt already taken when ``unique`` (different
    sizes can share a prompt): deterministic, and a larger ``num`` extends each count's list.
    ``shapes_options`` are further ShapesConfig fields (colours, shapes, backgrounds, test_fraction,
    antialias), which must match the model's training world for "held out" to hold.

    Note: the split holds out *layouts*, which include the objects' sizes; the same prompt with other sizes
    can be a training layout (every one-object prompt is, with some size).
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"adherence: num must be a positive int, got {num!r}")
    base = ShapesConfig(size=size, min_objects=min_objects, max_objects=max_objects, **shapes_options)
    counts = list(range(base.min_objects, base.max_objects + 1))
    share, extra = divmod(num, len(counts))
    cases = []
    for j, n in enumerate(counts):
        cfg = ShapesConfig(**{**{f.name: getattr(base, f.name) for f in fields(ShapesConfig)},
                              "min_objects": n, "max_objects": n})
        start = len(cases)
        need, taken, index = share + (j < extra), set(), 0
        while len(cases) < start + need:
            if index >= 20 * need + 500:  # far more draws than distinct prompts exist
                raise ValueError(f"adherence: the test split has only {len(taken)} distinct {count_tag(n)} prompts "
                                 f"(asked for {need}); ask for fewer or pass unique=False")
            scene = scene_at(seed, index, "test", cfg)
            index += 1
            text = caption(scene, with_background=len(cfg.backgrounds) > 1)
            if unique and text in taken:
                continue
            taken.add(text)
            cases.append(PromptCase(text, scene_targets(scene, cfg)["cells"], n, count_tag(n), scene, cfg))
    return cases


def rerendered(cases, seed: int = 1) -> list[PromptCase]:
    """The same prompts drawn again: each case's objects keep their shape, colour and cell and get a new size and
    position in their cell (drawn with ``seed``). Their real images are the floor of metrics that compare samples
    with the real images of their prompts: two real images of one prompt differ just this much."""
    rng = np.random.default_rng(seed)
    out = []
    for c in cases:
        objects = tuple(dataclasses.replace(o, size=int(rng.integers(SIZE_LEVELS)), jx=int(rng.integers(JITTER_LEVELS)),
                                            jy=int(rng.integers(JITTER_LEVELS))) for o in c.scene.objects)
        out.append(dataclasses.replace(c, scene=Scene(objects, c.scene.background)))
    return out


def real_images(cases, size: int | None = None) -> torch.Tensor:
    """The real test-split images (N, 3, H, W) in [-1, 1] of ``cases``, rendered as ShapesDataset does, at
    ``size`` (default: each case's world size, which must then agree)."""
    cases = list(cases)
    if not cases:
        raise ValueError("adherence: no cases to render")
    sizes = {c.config.size for c in cases} if size is None else {size}
    if len(sizes) != 1:
        raise ValueError(f"adherence: the cases come from worlds of sizes {sorted(sizes)}; pass size=")
    side = sizes.pop()
    out = [render_scene(c.scene, side, c.config.antialias)[0] for c in cases]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def read_cells(oracle, images: torch.Tensor, batch_size: int = 256, quantize: bool = True) -> torch.Tensor:
    """The oracle's reading (N, 9) of ``images`` (N, 3, H, W): argmax of ``oracle.cell_logits`` per cell, in
    eval mode, ``batch_size`` images at a time on the oracle's device, after 8-bit quantisation (as a PNG)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"adherence: images must be a (N, 3, H, W) tensor, got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError("adherence: the images contain NaN or inf")
    if batch_size < 1:
        raise ValueError(f"adherence: batch_size must be >= 1, got {batch_size}")
    params = next(iter(oracle.parameters()), None) if isinstance(oracle, torch.nn.Module) else None
    device = params.device if params is not None else torch.device("cpu")
    was = getattr(oracle, "training", False)
    if isinstance(oracle, torch.nn.Module):
        oracle.eval()
    try:
        out = []
        for xb in images.split(batch_size):
            xb = xb.to(device=device, dtype=torch.float32)
            out.append(oracle.cell_logits(quantize_8bit(xb) if quantize else xb).argmax(-1).cpu())
    finally:
        if isinstance(oracle, torch.nn.Module):
            oracle.train(was)
    return torch.cat(out)


def score(oracle, images: torch.Tensor, cells: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Passes (N,) bool: the oracle reads back exactly the prompt's objects from image i, i.e. all nine cells
    of ``read_cells(oracle, images)`` equal ``cells`` (N, 9): shape, colour and cell of each object, and no
    object where the prompt has none."""
    cells = torch.as_tensor(cells)
    if cells.ndim != 2 or cells.shape[1] != GRID * GRID:
        raise ValueError(f"adherence: cells must be (N, {GRID * GRID}), got shape {tuple(cells.shape)}")
    if len(cells) != len(images):
        raise ValueError(f"adherence: {len(images)} images for {len(cells)} prompts' cells")
    k = getattr(oracle, "num_classes", None)
    if k is not None and (cells.min() < 0 or cells.max() > k):
        raise ValueError(f"adherence: cell targets must be in [0, {k}] for this oracle ({k} classes), got "
                         f"[{int(cells.min())}, {int(cells.max())}]")
    return (read_cells(oracle, images, batch_size) == cells.long().cpu()).all(dim=1)


def adherence_report(passes, cases) -> dict:
    """{tag: {"rate", "passed", "count"}} per tag of ``cases`` (in order of first appearance; tags are
    "one object", "two objects", ... for held-out prompts) and "overall" (every image counted once)."""
    passes = torch.as_tensor(passes, dtype=torch.bool).reshape(-1)
    tags = [c.tag if isinstance(c, PromptCase) else str(c) for c in cases]
    if len(tags) != len(passes):
        raise ValueError(f"adherence: {len(passes)} scores for {len(tags)} cases")
    if not tags:
        raise ValueError("adherence: no cases to report")
    report = {}
    for tag in list(dict.fromkeys(tags)) + [OVERALL]:
        mask = torch.tensor([t == tag or tag == OVERALL for t in tags])
        passed, count = int(passes[mask].sum()), int(mask.sum())
        report[tag] = {"rate": passed / count, "passed": passed, "count": count}
    return report


def _rate(entry) -> str:
    return "-" if entry is None else f"{entry['rate']:.1%} ({entry['passed']}/{entry['count']})"


def format_adherence(model_report: dict, real_report: dict | None = None) -> str:
    """An aligned table: tag | model | real images (oracle ceiling), one row per tag and overall."""
    real_report = real_report or {}
    tags = [t for t in model_report if t != OVERALL] + [t for t in real_report if t not in model_report]
    rows = [("prompt adherence", "model", "real images (oracle ceiling)")]
    rows += [(t, _rate(model_report.get(t)), _rate(real_report.get(t))) for t in tags + [OVERALL]]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * (w0 + w1 + len(rows[0][2]) + 4))
    return "\n".join(lines)


def _check_classes(oracle, cases):
    """The cases' class ids must mean what the oracle's do (same shapes and colours in the same order)."""
    ocfg = getattr(oracle, "config", None)
    if ocfg is None or not hasattr(ocfg, "shapes") or not hasattr(ocfg, "colours"):
        return
    for c in cases:
        if (tuple(ocfg.shapes), tuple(ocfg.colours)) != (c.config.shapes, c.config.colours):
            raise ValueError(f"adherence: the oracle reads shapes {tuple(ocfg.shapes)} and colours "
                             f"{tuple(ocfg.colours)}, but the prompts use {c.config.shapes} and {c.config.colours}; "
                             "their class ids differ")


def evaluate_adherence(generate, oracle, cases, batch_size: int = 64, *, seed: int = 0) -> dict:
    """Generate an image per case and score it, and score the cases' real test images with the same oracle.

    ``generate(prompts: list[str], seeds: list[int]) -> (n, 3, H, W)`` in [-1, 1] is called ``batch_size``
    prompts at a time; case i gets seed ``seed + i``. Returns {"model": report, "real": report (the
    oracle's ceiling), "cases": [{"prompt", "tag", "seed", "passed", "read", "real_passed"}]} where "read"
    is what the oracle saw, as a prompt.
    """
    cases = list(cases)
    if not cases:
        raise ValueError("adherence: no cases to evaluate")
    if batch_size < 1:
        raise ValueError(f"adherence: batch_size must be >= 1, got {batch_size}")
    _check_classes(oracle, cases)
    cells = torch.stack([c.cells for c in cases])
    reads = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        seeds = list(range(seed + start, seed + start + len(chunk)))
        x = generate([c.prompt for c in chunk], seeds)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[:2] != (len(chunk), 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"adherence: generate returned {shape} for {len(chunk)} prompts; expected "
                             f"({len(chunk)}, 3, H, W) images in [-1, 1]")
        reads.append(read_cells(oracle, x.detach(), batch_size))
    read = torch.cat(reads)
    passes = (read == cells).all(1)
    real_passes = score(oracle, real_images(cases), cells, batch_size)
    per_case = [{"prompt": c.prompt, "tag": c.tag, "seed": seed + i, "passed": bool(passes[i]),
                 "read": cells_caption(read[i], c.config), "real_passed": bool(real_passes[i])}
                for i, c in enumerate(cases)]
    return {"model": adherence_report(passes, cases), "real": adherence_report(real_passes, cases), "cases": per_case}


__all__ = ["COUNT_WORDS", "OVERALL", "PromptCase", "adherence_report", "cells_caption", "count_tag",
           "evaluate_adherence", "format_adherence", "heldout_prompts", "parse_caption", "parse_objects",
           "read_cells", "real_images", "score"]
