"""What ``Pipeline.sample`` takes besides prompts and labels, checked and cut into batches: the fields of a spatial
condition (``conditions=``), the image-to-image / training-free inpainting inputs (``init_image``, ``strength``,
``mask``; SDEdit, Meng et al. 2022; RePaint, Lugmayr et al. 2022), and the per-step callback. Functions of a
pipeline (``pipe``), kept apart from pipeline.py so that the composition stays readable."""

from __future__ import annotations

import dataclasses

import torch

from .config import SampleSection
from .errors import RequestError
from .sample_options import check_size


def check_conditions(pipe, conditions, num: int) -> dict | None:
    """``Pipeline.sample``'s ``conditions`` checked against the model's spatial condition: its fields, each with
    ``num`` rows or 1 (shared)."""
    if pipe.spatial is None:
        if conditions:
            raise RequestError(f"this model takes no spatial condition; got conditions {sorted(conditions)}")
        return None
    if not isinstance(conditions, dict):
        raise RequestError(f"this model is conditioned on {pipe.spatial.name!r}: give conditions="
                           f"{{{', '.join(repr(f) + ': ...' for f in pipe.sample_fields)}}}")
    need = pipe.sample_fields
    missing = [f for f in need if f not in conditions]
    extra = [k for k in conditions if k not in need + pipe.spatial.optional_fields]
    if missing or extra:
        raise RequestError(f"the {pipe.spatial.name!r} condition takes the field(s) {list(need)}; "
                           + (f"missing {missing}" if missing else f"unknown {extra}"))
    for key, value in conditions.items():
        if key not in need:
            continue
        rows = len(value) if torch.is_tensor(value) or isinstance(value, (list, tuple)) else None
        if rows not in (1, num):
            raise RequestError(f"conditions[{key!r}] has {rows} rows; expected 1 (shared) or {num} (one per image)")
    return conditions


def check_edits(pipe, init_image, strength, mask, s: SampleSection) -> SampleSection:
    """Image-to-image and training-free inpainting inputs checked: init_image (N|1, C, H, W) in [-1, 1] with a
    strength in (0, 1] and/or a mask (N|1, 1, H, W) in [0, 1]; the image size follows init_image unless given."""
    if init_image is None:
        raise RequestError("strength and mask apply to init_image (image-to-image, inpainting): give init_image")
    if strength is None and mask is None:
        raise RequestError("init_image needs a strength (image-to-image) or a mask (inpainting)")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))
                                 or not 0.0 < strength <= 1.0):
        raise RequestError(f"strength must lie in (0, 1] (the share of the sampling steps run from the image), "
                           f"got {strength!r}")
    c = pipe.config.data.channels
    if not torch.is_tensor(init_image) or init_image.dim() != 4 or init_image.shape[1] != c:
        got = tuple(init_image.shape) if torch.is_tensor(init_image) else type(init_image).__name__
        raise RequestError(f"init_image must be a (N or 1, {c}, H, W) tensor in [-1, 1], got {got}")
    if len(init_image) not in (1, s.num):
        raise RequestError(f"init_image has {len(init_image)} rows; expected 1 (shared) or {s.num}")
    if not torch.isfinite(init_image).all() or init_image.abs().max() > 1 + 1e-4:
        raise RequestError("init_image must hold finite values in [-1, 1]")
    size = tuple(init_image.shape[-2:])
    if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 4 or mask.shape[1] != 1
                             or len(mask) not in (1, s.num) or tuple(mask.shape[-2:]) != size
                             or not mask.is_floating_point() or mask.min() < 0 or mask.max() > 1):
        got = f"{tuple(mask.shape)} {mask.dtype}" if torch.is_tensor(mask) else type(mask).__name__
        raise RequestError(f"mask must be a float (N or 1, 1, {size[0]}, {size[1]}) tensor in [0, 1] (1 = "
                           f"generate), got {got}")
    if s.size is None and size != pipe.image_shape[1:]:
        check_size(pipe, size)
        s = dataclasses.replace(s, size=list(size))
    elif s.size is not None and tuple(s.size) != size:
        raise RequestError(f"init_image is {size[0]}x{size[1]} but the size asked is {s.size[0]}x{s.size[1]}")
    return s

def edit_options(pipe, init_image, strength, mask, start: int, n: int, seed: int) -> dict:
    """The sampler's img2img / RePaint options for samples start..start+n-1 (samplers/editing.py): the image
    on the diffusion's grid (encoded; a posterior sample from ``seed``) and the mask of what is kept there (a
    latent cell is generated when any of its pixels is)."""
    z = pipe.encode(batch_rows(init_image, start, n).to(pipe.device), generator=torch.Generator().manual_seed(seed))
    opts = {} if strength is None else {"init_image": z, "strength": float(strength)}
    if mask is not None:
        fill = batch_rows(mask, start, n).to(device=z.device, dtype=z.dtype)
        if fill.shape[-2:] != z.shape[-2:]:
            fill = torch.nn.functional.adaptive_max_pool2d(fill, z.shape[-2:])
        opts.update(known=z, mask=1.0 - fill)
    return opts


def batch_rows(value, start: int, n: int):
    """Rows start .. start+n-1 of a per-image condition, or its one shared row repeated n times."""
    if len(value) == 1:
        return value.expand(n, *value.shape[1:]) if torch.is_tensor(value) else list(value) * n
    return value[start : start + n]


def step_callback(bar, callback, start: int, n: int):
    """The sampler's ``callback(i, t, x, x0)`` for the batch of samples start..start+n-1: advances the progress bar
    by n and calls the user's ``callback(start, i, t, x, x0)``; None when there is neither."""
    if bar is None and callback is None:
        return None

    def step(i, t, x, x0):
        if bar is not None:
            bar.update(n)
        if callback is not None:
            callback(start, i, t, x, x0)

    return step


def per_image(value) -> bool:
    """Whether an optional condition field (a noise level) holds one entry per image rather than one value."""
    return (torch.is_tensor(value) and value.dim() > 0) or isinstance(value, (list, tuple))
