"""What each served model takes, and the one mapping from a request to ``Pipeline.sample``'s arguments.

:func:`describe` tells the page (``GET /api/models``) which inputs to show; :func:`sample_arguments` turns a
validated request and its uploads into the keyword arguments of ``Pipeline.sample`` and the parameters written
into each image's PNG. Every input the page has goes through that one function:

=====================  ====================================================================================
page input             Pipeline.sample argument
=====================  ====================================================================================
prompt, negative       ``prompts`` (one per image), ``negative_prompt``
class picker           ``labels`` (one per image)
layout editor          ``layouts`` (models with ``Pipeline.takes_layouts``)
spatial condition      ``conditions[field]``: a class-id map (segmentation), an image (low-res)
image + strength       ``init_image``, ``strength`` (SDEdit; latent models encode the image)
image + painted mask   a model trained to inpaint (fields "image" and "mask"): ``conditions``; any other
                       model: ``init_image`` and ``mask`` (training-free RePaint masked sampling)
sampler, steps, ...    ``sampler``, ``steps``, ``guidance``, ``eta``, ``seed`` (one per image), ``size``
=====================  ====================================================================================

A spatial condition's field name picks its page input in :data:`FIELD_INPUTS`; the fields a model needs at
sampling are ``Pipeline.sample_fields`` where the pipeline has it, else ``Pipeline.condition_fields``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RequestError
from ..pipeline import Pipeline
from ..samplers import RESAMPLING_SAMPLERS, SAMPLERS
from .schema import GenerateRequest, Limits

# A spatial condition's field -> the page input that fills it: "class_map" (a PNG of class ids), "image" (an
# uploaded image, e.g. the low-resolution one), "inpaint" (the uploaded image or the painted mask of a model
# trained to inpaint: the page's image and mask canvas fill them).
FIELD_INPUTS = {"segmentation": "class_map", "low_res": "image", "image": "inpaint", "mask": "inpaint"}
EDIT_UPLOADS = ("init_image", "mask")       # the uploads every model takes: img2img source / inpainting image, mask
INPAINT_FIELDS = ("image", "mask")          # the sample fields of a model trained to inpaint
DEFAULT_STRENGTH = 0.75                     # img2img strength when an image comes without a mask or a strength


@dataclass
class ServedModel:
    """A loaded model and the name the API calls it by."""

    name: str
    path: str           # the folder it was loaded from (written into each PNG as "model")
    pipe: Pipeline


@dataclass
class Plan:
    """A request turned into work: ``Pipeline.sample(**kwargs)`` draws ``num`` images; image i gets ``params[i]``."""

    kwargs: dict
    params: list[dict]
    total: int                          # sampler steps the job runs (progress: step of total)
    batch_key: str | None = None        # requests with the same key may be drawn in one batch; None: never
    uploads: list[str] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.kwargs["num"]


def guidance_allowed(pipe: Pipeline) -> bool:
    """Whether classifier-free guidance applies: a class or text model, or a spatial one trained with a null map."""
    return pipe.conditioning is not None or bool(pipe.conditioner is not None and pipe.conditioner.config.drop_concat)


def sample_fields(pipe: Pipeline) -> tuple[str, ...]:
    """The spatial condition's fields that sampling needs."""
    return tuple(getattr(pipe, "sample_fields", pipe.condition_fields))


def trained_inpainting(pipe: Pipeline) -> bool:
    """Whether the model is trained to inpaint (its condition takes the image and the mask)."""
    return set(INPAINT_FIELDS) <= set(sample_fields(pipe))


def takes_layouts(pipe: Pipeline) -> bool:
    return bool(getattr(pipe, "takes_layouts", False))


def upload_fields(pipe: Pipeline) -> tuple[str, ...]:
    """The multipart file fields a request for ``pipe`` may carry: init_image and mask, and the uploads of its
    spatial condition (a trained inpainting model takes its image and mask as init_image and mask)."""
    return EDIT_UPLOADS + tuple(f for f in sample_fields(pipe) if FIELD_INPUTS.get(f) != "inpaint")


def describe(model: ServedModel, limits: Limits) -> dict:
    """What ``GET /api/models`` says of one model: its inputs, samplers, defaults and the limits."""
    pipe = model.pipe
    s = pipe.config.sample
    channels, height, width = pipe.image_shape
    conditions = {f: FIELD_INPUTS.get(f, "image") for f in sample_fields(pipe) if FIELD_INPUTS.get(f) != "inpaint"}
    info = {
        "name": model.name,
        "conditioning": pipe.conditioning,
        "latent": pipe.autoencoder is not None,
        "channels": channels,
        "inputs": {
            "prompt": pipe.takes_prompts,
            "negative_prompt": pipe.takes_prompts,
            "classes": pipe.num_classes,
            "conditions": conditions,
            "layout": takes_layouts(pipe),
            "guidance": guidance_allowed(pipe),
            "init_image": not trained_inpainting(pipe),
            "inpaint": "trained" if trained_inpainting(pipe) else "repaint",
        },
        "samplers": sorted(SAMPLERS),
        "resampling_samplers": list(RESAMPLING_SAMPLERS),
        "defaults": {
            "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "eta": s.eta, "num": 1,
            "size": [height, width], "strength": DEFAULT_STRENGTH,
            "prompt": (s.prompts or [s.prompt])[0] if pipe.takes_prompts else None,
            "negative_prompt": s.negative_prompt or "",
        },
        "size_multiple": pipe.downsampling_factor,
        "max_steps": min(limits.max_steps, pipe.diffusion.num_steps),
        "limits": {"max_steps": limits.max_steps, "max_images": limits.max_images, "max_size": limits.max_size,
                   "max_upload_bytes": limits.max_upload_bytes},
    }
    if takes_layouts(pipe):
        from ..data.shapes import COLOURS, SHAPES

        info["layout_vocabulary"] = {"shapes": list(SHAPES), "colours": list(COLOURS)}
    return info


# ------------------------------------------------------------------------------------------------------------
# Uploads -> tensors


def image_tensor(image, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image -> (1, channels, H, W) in [-1, 1], resized (bicubic) to ``size`` = (H, W) when given."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise RequestError(f"images for a {channels}-channel model cannot be uploaded (1 or 3 channels)")
    image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def fill_mask(image, size: tuple[int, int]) -> torch.Tensor:
    """A painted mask (white = fill) -> (1, 1, H, W) float, 1 where the image is to be generated."""
    from PIL import Image

    mask = image.convert("L")
    if mask.size != (size[1], size[0]):
        mask = mask.resize((size[1], size[0]), Image.NEAREST)
    fill = torch.from_numpy(np.asarray(mask) > 127).float()[None, None]
    if not fill.any():
        raise RequestError("mask: nothing is painted (white marks the region to fill)")
    return fill


def class_map(image, name: str) -> torch.Tensor:
    """A PNG of class ids (mode L or P: the pixel values, or palette indices, are the ids) -> (1, H, W) long."""
    if image.mode not in ("L", "P", "I", "I;16"):
        raise RequestError(f"{name}: expected a PNG of class ids (grayscale or palette), got mode {image.mode}")
    return torch.from_numpy(np.asarray(image).astype(np.int64))[None]


def _condition(pipe: Pipeline, field_name: str, req: GenerateRequest, uploads: dict, size):
    """The value of the spatial condition's field ``field_name`` from the request or its upload (one shared row)."""
    kind = FIELD_INPUTS.get(field_name, "image")
    if kind == "inpaint":  # a model trained to inpaint: the image and the painted mask (1 = fill)
        upload = {"image": "init_image"}.get(field_name, field_name)
        if upload not in uploads:
            raise RequestError(f"{upload}: this model inpaints; upload the image as 'init_image' and the mask as "
                               "'mask' (white = fill)")
        if field_name == "mask":
            return fill_mask(uploads[upload], size)
        return image_tensor(uploads[upload], pipe.image_shape[0], size)
    if field_name not in uploads:
        raise RequestError(f"this model is conditioned on {field_name!r}: upload it as the file field {field_name!r}")
    if kind == "class_map":
        return class_map(uploads[field_name], field_name)
    return image_tensor(uploads[field_name], pipe.image_shape[0])


# ------------------------------------------------------------------------------------------------------------
# The mapping


def sample_arguments(model: ServedModel, req: GenerateRequest, uploads: dict, *, seed: int) -> Plan:
    """``req`` (schema-checked) and its ``uploads`` (field -> PIL image) -> the keyword arguments of
    ``Pipeline.sample`` with one prompt, label and seed per image, and each image's PNG parameters. The model
    checks what it takes (``Pipeline.sample_options``); anything it refuses is a RequestError or ConfigError."""
    pipe = model.pipe
    allowed = upload_fields(pipe)
    extra = sorted(set(uploads) - set(allowed))
    if extra:
        raise RequestError(f"unexpected upload(s) {extra}; this model takes {list(allowed)}")
    if req.layout is not None and not takes_layouts(pipe):
        raise RequestError("layout: this model takes no layout")
    if takes_layouts(pipe) and not req.layout:
        raise RequestError("layout: this model is conditioned on a layout: give a list of objects")
    layout = [obj.model_dump() for obj in req.layout] if req.layout else None
    if layout is not None:
        pipe.parse_layouts(layout)  # refused here, naming the object, rather than failing the job later
    if trained_inpainting(pipe) and req.strength is not None:
        raise RequestError("strength: this model is trained to inpaint; it fills the mask and takes no strength")
    s = pipe.sample_options(num=req.num, prompts=req.prompt, negative_prompt=req.negative_prompt, labels=req.label,
                            sampler=req.sampler, steps=req.steps, guidance=req.guidance, eta=req.eta, seed=seed,
                            size=req.size, batch_size=req.num)
    size = tuple(s.size) if s.size is not None else None
    fields = sample_fields(pipe)
    # Conditions that imply the size (a map) first, then those resized to it (the inpainting image and mask).
    conditions = {f: _condition(pipe, f, req, uploads, None) for f in fields if FIELD_INPUTS.get(f) != "inpaint"}
    implied = pipe.spatial.image_size(conditions) if pipe.spatial is not None and conditions else None
    if size is not None and implied is not None and tuple(implied) != size:
        raise RequestError(f"size {size[0]}x{size[1]} differs from the {implied[0]}x{implied[1]} of the uploaded "
                           f"{'/'.join(conditions)}: leave size out (it follows the upload) or give that size")
    if size is None and implied is not None:
        try:
            pipe.sample_options(size=tuple(implied))
        except RequestError as e:
            raise RequestError(f"{'/'.join(conditions)}: the upload makes a {implied[0]}x{implied[1]} image, "
                               f"which this model cannot draw: {e}") from None
    size = size or (tuple(implied) if implied is not None else None)
    size = size or tuple(pipe.image_shape[1:])
    conditions.update({f: _condition(pipe, f, req, uploads, size) for f in fields if FIELD_INPUTS.get(f) == "inpaint"})
    edits, flags = _edits(pipe, req, uploads, size) if not trained_inpainting(pipe) else ({}, {})
    if trained_inpainting(pipe):
        flags = {"init_image": True, "mask": True, "masked_fraction": round(float(conditions["mask"].mean()), 4)}
    n = s.num
    kwargs = {"num": n, "negative_prompt": s.negative_prompt, "sampler": s.sampler, "steps": s.steps,
              "guidance": s.guidance, "eta": s.eta, "seed": [s.seed + i for i in range(n)], "size": s.size,
              "batch_size": n, "conditions": conditions or None, **edits}
    params = []
    labels = (s.labels or list(range(pipe.num_classes))) if pipe.conditioning == "class" else None
    for i in range(n):
        p = {"model": model.path}
        if s.prompts is not None:
            p.update(prompt=s.prompts[i % len(s.prompts)], negative_prompt=s.negative_prompt or "")
        if labels is not None:
            p["class"] = labels[i % len(labels)]
        p.update(seed=s.seed + i, sampler=s.sampler, steps=s.steps, guidance=s.guidance, eta=s.eta,
                 spacing=s.spacing, num=n, size=list(size), **flags)
        if layout is not None:
            p["layout"] = layout
        params.append(p)
    if layout is not None:
        kwargs["layouts"] = [layout]
    if s.prompts is not None:
        kwargs["prompts"] = [p["prompt"] for p in params]
    if labels is not None:
        kwargs["labels"] = [p["class"] for p in params]
    strength = edits.get("strength")
    total = s.steps if strength is None else max(1, math.ceil(round(strength * s.steps, 9)))
    key = None
    if not conditions and not edits:  # nothing per request but prompts, labels and seeds: batchable
        same = {k: v for k, v in kwargs.items() if k not in ("num", "prompts", "labels", "seed", "batch_size")}
        key = json.dumps({"model": model.name, **same}, sort_keys=True, default=str)
    return Plan(kwargs=kwargs, params=params, total=total, batch_key=key, uploads=sorted(uploads))


def _edits(pipe: Pipeline, req: GenerateRequest, uploads: dict, size) -> tuple[dict, dict]:
    """Image-to-image and training-free inpainting: ``init_image`` (resized to the output size), ``strength`` and
    ``mask`` (1 = generate) for ``Pipeline.sample``, and the flags that the PNG records."""
    image, mask = uploads.get("init_image"), uploads.get("mask")
    if mask is not None and image is None:
        raise RequestError("mask: a mask is painted over an image; upload the image as 'init_image' too")
    if req.strength is not None and image is None:
        raise RequestError("strength is for image-to-image: upload the image as 'init_image'")
    if image is None:
        return {}, {}
    edits = {"init_image": image_tensor(image, pipe.image_shape[0], size)}
    flags = {"init_image": True}
    if mask is None or req.strength is not None:
        edits["strength"] = flags["strength"] = req.strength if req.strength is not None else DEFAULT_STRENGTH
    if mask is not None:
        edits["mask"] = fill_mask(mask, size)
        flags.update(mask=True, masked_fraction=round(float(edits["mask"].mean()), 4))
    return edits, flags


def model_name(path: str, taken: set[str]) -> str:
    """A served model's name: its folder's name, with -2, -3 ... when taken."""
    base = Path(path).resolve().name or "model"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name
