"""The sample options of a pipeline, checked in one place for every caller (``Pipeline.sample``, ``latentdiff
sample``, ``latentdiff eval``, the server): the config's sample section with the given values in place, and what
the model can take (prompts, labels, guidance, an image size its downsampling divides). Functions of a pipeline
(``pipe``), kept apart from pipeline.py so that the composition stays readable."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

from .config import SampleSection, update
from .errors import ConfigError, RequestError

if TYPE_CHECKING:
    from .diffusion import GaussianDiffusion


def sample_options(pipe, **given) -> SampleSection:
    """The config's sample section with the ``given`` values in place (None keeps the config's), checked in
    this one place for every caller (``sample``, ``latentdiff sample``, ``latentdiff eval``): types and
    ranges as in a config file, a known sampler, at most the T steps of training, class labels only for a
    class-conditional model (in 0..K-1), prompts only for a text model (each within the context length),
    guidance only for a conditional one, a size the downsampling divides. Raises ConfigError or RequestError
    naming the option.

    ``labels`` may be one id or any iterable of ids (list, range, array); they come back as a list of ints.
    ``prompts`` may be one string or a list of strings; they come back as a list.
    """
    from .samplers import SAMPLERS

    labels, prompts = given.pop("labels", None), given.pop("prompts", None)
    # None keeps the config's value; numpy and torch scalars become Python numbers.
    given = {k: (v.item() if hasattr(v, "item") else v) for k, v in given.items() if v is not None}
    if labels is not None:
        given["labels"] = [int(v) for v in (labels if hasattr(labels, "__iter__") else [labels])]
    if prompts is not None:
        given["prompts"] = [prompts] if isinstance(prompts, str) else list(prompts)
    if "size" in given:
        size = given["size"]
        given["size"] = [size, size] if isinstance(size, int) else list(size)
    s = update(pipe.config.sample, given, where="sample options")
    if s.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {s.sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    if s.steps > pipe.diffusion.num_steps:
        raise ConfigError(f"steps {s.steps} exceeds the model's {pipe.diffusion.num_steps} training steps")
    s = check_requests(pipe, s)
    check_size(pipe, s.size)
    return s

def check_requests(pipe, s: SampleSection) -> SampleSection:
    """``s`` checked against what the model takes: prompts (text models), labels (class models), guidance (a
    conditional model); a text model's prompts resolved (the config's single prompt becomes a list)."""
    kind = pipe.conditioning
    kinds = {"class": "class-conditional (give class labels)", "text": "text-conditioned (give prompts)",
             "layout": "layout-conditioned (give layouts)", None: "unconditional"}
    if kind != "text" and (s.prompts is not None or s.negative_prompt is not None):
        raise ConfigError(f"this model is {kinds[kind]}: it takes no prompts")
    if kind != "class" and s.labels is not None:
        raise ConfigError(f"this model is {kinds[kind]}: it takes no class labels")
    # A null spatial input (the CLIP conditioner of an imported model has no spatial input and no config).
    dropped = bool(getattr(getattr(pipe.conditioner, "config", None), "drop_concat", False))
    if kind is None and s.guidance != 1.0 and not dropped:
        what = "unconditional" if pipe.spatial is None else (
            f"conditioned on its {pipe.spatial.name} alone, which guidance keeps in both branches "
            "(conditioning.drop_concat is false)")
        raise ConfigError(f"guidance needs a class-conditional model or a text-conditioned one "
                          f"(this one is {what})")
    if kind == "class" and s.labels is not None:
        if not s.labels:
            raise ConfigError("labels is empty")
        bad = [v for v in s.labels if not 0 <= v < pipe.num_classes]
        if bad:
            raise ConfigError(f"class label(s) {bad} out of range 0..{pipe.num_classes - 1}")
    if kind == "text":
        prompts = s.prompts if s.prompts is not None else ([s.prompt] if s.prompt is not None else None)
        if prompts is None:
            raise ConfigError("this model is text-conditioned: give prompts (--prompt)")
        if not prompts:
            raise ConfigError("the prompt list is empty")
        try:
            pipe.conditioner.tokenizer.encode(prompts + [s.negative_prompt or ""])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        s = dataclasses.replace(s, prompts=prompts)
    return s

def check_size(pipe, size) -> None:
    """A RequestError unless ``size`` (None: the training size) is (H, W) pixels that the model's downsampling
    (first stage x U-Net) divides."""
    if size is None:
        return
    f = pipe.downsampling_factor
    if len(size) != 2 or any(v < 1 for v in size):
        raise RequestError(f"size must be (height, width) in pixels, got {size}")
    if any(v % f for v in size):
        raise RequestError(f"size {size[0]}x{size[1]} is not divisible by {f}, the model's downsampling "
                           f"(first stage f={pipe.downsampling_factor // pipe.unet.config.downsampling_factor} "
                           f"x U-Net {pipe.unet.config.downsampling_factor}); use multiples of {f}")


def warn_ill_conditioned_start(pipe, opts: dict) -> None:
    """Warn when the sampling options start at an ill-conditioned t = T−1 of a latent model (see below)."""
    if pipe.autoencoder is None:  # pixel models have clip_x0 for this
        return
    factor = _ill_conditioned_start(pipe.diffusion, opts)
    if factor is not None:
        warnings.warn(f"sampling starts at t = T-1, where 1/sqrt(alpha_bar) = {factor:.3g}: the network's eps "
                      "error reaches x0_hat multiplied by that and latents (which have no clip_x0) blow up; use "
                      "spacing='leading', a schedule with a larger alpha_bar_T (scaled_linear), or v-prediction",
                      stacklevel=3)


def _ill_conditioned_start(diffusion: GaussianDiffusion, opts: dict) -> float | None:
    """1/√ᾱ at t = T−1 when sampling starts there with ε-prediction and an unclipped x̂_0 and that factor
    exceeds 1,000 (an ε error reaches x̂_0 multiplied by it); else None."""
    starts_at_end = opts.get("karras") or opts.get("spacing") in ("trailing", "linspace")
    if not starts_at_end or opts.get("clip_x0") or diffusion.prediction != "eps":
        return None
    factor = float(diffusion.alphas_cumprod[-1]) ** -0.5
    return factor if factor > 1e3 else None
