"""Generation parameters inside the PNGs that ``latentdiff sample`` writes, and reading them back.

A PNG may carry text chunks (PNG specification, sec. 11.3.4: tEXt in Latin-1, iTXt in UTF-8). Each written
image gets two:

- ``latentdiff`` (iTXt, UTF-8): JSON of every parameter (prompt, negative prompt, seed, sampler, steps,
  guidance, model, size, ... any JSON-able dict); :func:`read_png_params` returns it as it was given;
- ``parameters``: a human-readable summary in the layout that AUTOMATIC1111's web UI writes and other tools
  read: the prompt, then ``Negative prompt: ...``, then one line of ``Key: value`` pairs
  (``Steps: 20, Sampler: dpmpp_2m, CFG scale: 3, Seed: 0, Size: 32x32, Model: ...``; Size is width x height).

The file is written atomically (:mod:`latentdiff.fileio`): an error while writing leaves no partial file and
any previous file at the path untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fileio import atomic_write

CHUNK, SUMMARY_CHUNK = "latentdiff", "parameters"
# Summary keys in A1111's order and spelling; the rest follow in the order given.
_SUMMARY_NAMES = {"steps": "Steps", "sampler": "Sampler", "guidance": "CFG scale", "seed": "Seed", "model": "Model"}
_NOT_IN_SUMMARY = {"prompt", "negative_prompt", "size"}  # own lines, or Size from the image itself


def _to_json(params) -> str:
    if not isinstance(params, dict):
        raise TypeError(f"PNG parameters must be a dict, got {type(params).__name__}")
    bad = [k for k in params if not isinstance(k, str)]
    if bad:
        raise TypeError(f"PNG parameter names must be strings, got {bad!r}")
    for k, v in params.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"PNG parameter {k!r} is not JSON-able ({e})") from None
    return json.dumps(params, ensure_ascii=False, allow_nan=False)


def _value(v) -> str:
    """A summary value: as written for plain scalars, JSON (quoted) when it would break the line or the pairs."""
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    if isinstance(v, str) and any(c in v for c in ",:\n\r\""):
        return json.dumps(v, ensure_ascii=False)
    return text.replace("\n", " ")


def summary(params: dict, size: tuple[int, int] | None = None) -> str:
    """A1111-style text: prompt, ``Negative prompt: ...`` (if any), then one line of ``Key: value`` pairs.
    ``size`` (width, height) of the image gives ``Size: WxH``."""
    lines = []
    prompt = params.get("prompt")
    if prompt is not None:
        lines.append(str(prompt).replace("\n", " "))
    neg = params.get("negative_prompt")
    if neg:
        lines.append(f"Negative prompt: {str(neg)}".replace("\n", " "))
    pairs = []
    for k, name in _SUMMARY_NAMES.items():
        if k == "model" and size is not None:
            pairs.append(f"Size: {size[0]}x{size[1]}")
        if k in params:
            pairs.append(f"{name}: {_value(params[k])}")
    pairs += [f"{k.replace('_', ' ').capitalize()}: {_value(v)}" for k, v in params.items()
              if k not in _SUMMARY_NAMES and k not in _NOT_IN_SUMMARY]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_png(image, path, params: dict) -> Path:
    """Write the PIL ``image`` to ``path`` as a PNG carrying ``params`` (a JSON-able dict), atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if not isinstance(image, Image.Image):
        raise TypeError(f"save_png expects a PIL image, got {type(image).__name__}")
    info = PngInfo()
    info.add_itxt(CHUNK, _to_json(params))
    info.add_text(SUMMARY_CHUNK, summary(params, image.size))  # tEXt, or iTXt when not Latin-1
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_params(path) -> dict:
    """The parameters :func:`save_png` stored in the PNG at ``path``; an error naming the file when it is not
    a PNG or carries no (or unreadable) latentdiff metadata."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            fmt = im.format
            text = dict(im.text) if fmt == "PNG" else {}  # all tEXt, zTXt and iTXt chunks
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable PNG image ({e})") from None
    if fmt != "PNG":
        raise ValueError(f"{path} is a {fmt} image, not a PNG: it carries no latentdiff parameters")
    if CHUNK not in text:
        raise ValueError(f"{path} has no latentdiff metadata (no {CHUNK!r} text chunk): it was not written by "
                         "latentdiff sample")
    try:
        params = json.loads(text[CHUNK])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {CHUNK!r} text chunk is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: the {CHUNK!r} text chunk holds a {type(params).__name__}, not a parameter mapping")
    return params


def format_params(params: dict) -> str:
    """One ``name: value`` line per parameter (prompt first), for ``latentdiff info image.png``."""
    first = [k for k in ("prompt", "negative_prompt") if k in params]
    order = first + [k for k in params if k not in first]
    if not order:
        return "(no parameters)"
    width = max(len(k) for k in order)
    lines = []
    for k in order:
        v = params[k]
        v = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        lines.append(f"{k.replace('_', ' '):<{width}}  {v}")
    return "\n".join(lines)
