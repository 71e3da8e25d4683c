"""The request schema of ``POST /api/generate`` and the server's limits.

The schema checks types and ranges (a bad field is a 422 that names it, FastAPI's error format); the limits are
the operator's (``latentdiff serve --max-steps ...``) and a request past one gets a 400 that names it. What a
given model accepts (a prompt, a class, a spatial condition, its samplers) is checked afterwards by the model
itself (``Pipeline.sample_options``), in :func:`latentdiff.serve.inputs.sample_arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; past a limit it gets 400 (``LimitError``)."""

    max_steps: int = 200                    # sampling steps per image
    max_images: int = 16                    # images per request (and per batch of merged requests)
    max_size: int = 1024                    # pixels per side of a generated image
    max_upload_bytes: int = 8 * 2**20       # bytes per uploaded file (init image, mask, map)
    max_queue: int = 16                     # jobs queued or running, all models together; past it: 429
    max_prompt_chars: int = 1000            # characters of a prompt or negative prompt


class LimitError(ValueError):
    """A request past one of the server's :class:`Limits`: answered 400 with this message."""


class LayoutObject(BaseModel):
    """One object of a layout: its shape, colour and box (x0, y0, x1, y1) in [0, 1] of the image."""

    model_config = ConfigDict(extra="forbid")
    shape: str = Field(min_length=1, max_length=64)
    colour: str = Field(min_length=1, max_length=64)
    box: tuple[float, float, float, float]


class GenerateRequest(BaseModel):
    """The fields of a generation request (JSON, or the ``params`` part of a multipart request). None keeps the
    model's default (its config's sample section); ``seed`` None draws a random seed, which the PNG records."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="a served model's name (GET /api/models); None = the first")
    prompt: str | None = Field(None, description="text models: the caption")
    negative_prompt: str | None = Field(None, description="text models: the caption guidance steers away from")
    label: int | None = Field(None, ge=0, description="class-conditional models: the class id")
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    eta: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**62)
    num: int = Field(1, ge=1, description="images to draw; image i uses seed + i")
    size: tuple[int, int] | None = Field(None, description="(height, width) in pixels; None = the training size")
    strength: float | None = Field(None, gt=0, le=1, description="image-to-image: the part of the grid that is run")
    layout: list[LayoutObject] | None = Field(None, description="layout models: the objects and their boxes")


def check_limits(req: GenerateRequest, limits: Limits) -> None:
    """Raise LimitError naming the first limit ``req`` exceeds (steps, images, size, prompt length)."""
    if req.steps is not None and req.steps > limits.max_steps:
        raise LimitError(f"steps {req.steps} exceeds this server's limit of {limits.max_steps}")
    if req.num > limits.max_images:
        raise LimitError(f"num {req.num} exceeds this server's limit of {limits.max_images} images per request")
    if req.size is not None and (max(req.size) > limits.max_size or min(req.size) < 1):
        raise LimitError(f"size {req.size[0]}x{req.size[1]} is outside 1..{limits.max_size} pixels per side "
                         "(this server's limit)")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise LimitError(f"{name} has {len(text)} characters; this server's limit is {limits.max_prompt_chars}")
