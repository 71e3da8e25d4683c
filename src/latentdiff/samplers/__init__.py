"""Samplers: one function per algorithm (see the module of each) and the entry point :func:`sample`.

Every sampler has the signature
``sample_NAME(model_fn, x, timesteps, *, diffusion, generator=None, callback=None, clip_x0=False, project=None, **options)``
and returns the final sample. :func:`sample` builds the grid, the noise, the per-sample generators, binds
conditioning and classifier-free guidance, and implements img2img, inpainting (with RePaint resampling)
and the Langevin corrector around any of them through the ``project`` hook.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import torch

from ..guidance import classifier_free_guidance
from .common import alpha_bar, alpha_bars, make_timesteps, randn, sigma_to_t
from .ddim import ddim_invert, sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from .euler import sample_euler, sample_euler_ancestral, sample_heun
from .langevin import langevin_correct, sample_langevin
from .plms import sample_plms
from .unipc import sample_unipc

SAMPLERS: dict[str, Callable] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "langevin": sample_langevin,
}

RESAMPLING_SAMPLERS = ("ddpm", "ddim")  # samplers that implement RePaint's resample_jumps

__all__ = ["SAMPLERS", "sample", "ddim_invert", "make_generators"] + [f.__name__ for f in SAMPLERS.values()]


def make_generators(seed, batch: int) -> list[torch.Generator] | None:
    """One CPU generator per sample: ``seed`` an int (sample i gets seed + i), a list of ints, or None."""
    if seed is None:
        return None
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        seeds = [int(seed) + i for i in range(batch)]
    elif isinstance(seed, (list, tuple)) and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed):
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for a batch of {batch}")
        seeds = [int(s) for s in seed]
    else:
        raise TypeError(f"seed must be None, an int or a list of ints, got {seed!r}")
    return [torch.Generator().manual_seed(s) for s in seeds]


def _like(name: str, v, noise: torch.Tensor, *, channels_one: bool = False) -> torch.Tensor:
    """Validate an image-shaped input against the noise: same shape, or batch 1 (broadcast); mask may have 1 channel."""
    if not torch.is_tensor(v):
        raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    ok_c = (noise.shape[1], 1) if channels_one else (noise.shape[1],)
    if v.ndim != noise.ndim or v.shape[0] not in (noise.shape[0], 1) or v.shape[1] not in ok_c or v.shape[2:] != noise.shape[2:]:
        want = f"{tuple(noise.shape)} (or batch 1{', or 1 channel' if channels_one else ''})"
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected {want}")
    v = v.to(device=noise.device, dtype=noise.dtype)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v


def _accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _sampler_options(name: str, fn: Callable, *, eta, set_alpha_to_one, resample_jumps, corrector_steps, snr, extra) -> dict:
    """The options this sampler takes; a non-default option it does not take is an error, not ignored."""
    opts = {}
    if _accepts(fn, "eta"):
        opts["eta"] = eta
    elif eta != 0:
        raise ValueError(f"sampler {name!r} takes no eta (it is deterministic or has no η)")
    if _accepts(fn, "set_alpha_to_one"):
        opts["set_alpha_to_one"] = set_alpha_to_one
    elif not set_alpha_to_one:
        raise ValueError(f"set_alpha_to_one=False applies to ddim and plms only, not {name!r}")
    if resample_jumps:
        if name not in RESAMPLING_SAMPLERS:
            raise ValueError(f"resample_jumps (RePaint) is implemented for {', '.join(RESAMPLING_SAMPLERS)} only, not {name!r}")
        opts["resample_jumps"] = resample_jumps
    if name == "langevin":
        opts["snr"] = snr
        if corrector_steps:
            opts["corrector_steps"] = corrector_steps
    params = inspect.signature(fn).parameters
    for k, v in (extra or {}).items():
        if k not in params:
            raise TypeError(f"sampler {name!r} has no option {k!r}")
        opts[k] = v
    return opts


@torch.no_grad()
def sample(
    model_fn: Callable,
    noise: torch.Tensor,
    *,
    diffusion,
    sampler: str,
    steps: int,
    spacing: str = "leading",  # timestep grid: leading | trailing | linspace (see schedules.timesteps)
    offset: int = 0,  # added to a leading grid (Stable Diffusion: 1)
    set_alpha_to_one: bool = True,  # ddim/plms: end at ᾱ = 1 (False: at ᾱ_0, the CompVis convention)
    eta: float = 0.0,  # stochasticity of ddim (and of samplers that take an η)
    clip_x0: bool = False,  # clamp x̂_0 to [-1, 1] at every step (pixel-space models)
    karras: bool = False,  # Karras σ grid (fractional timesteps) instead of an integer grid
    seed=None,  # None, int (sample i uses seed + i) or list of ints: x_T and all fresh noise per sample
    callback: Callable | None = None,  # callback(i, t, x, x0_hat) after each step
    guidance_scale: float = 1.0,  # classifier-free guidance s; 1 = conditional model, no extra pass
    uncond: dict | None = None,  # unconditional keyword arguments for guidance (e.g. {"y": null_class})
    guidance_rescale: float = 0.0,  # φ of Lin et al. 2024 (0 = off)
    init_image: torch.Tensor | None = None,  # img2img: start from this image noised to the first kept step
    strength: float = 1.0,  # img2img: fraction of the grid that is run, in (0, 1]
    mask: torch.Tensor | None = None,  # inpainting: 1 = keep ``known``, 0 = generate; (B|1, C|1, H, W)
    known: torch.Tensor | None = None,  # inpainting: the image whose masked region is kept
    resample_jumps: int = 0,  # inpainting with ddpm/ddim: RePaint re-noise/denoise rounds per step
    corrector_steps: int = 0,  # Langevin corrector steps after each step (predictor-corrector)
    snr: float = 0.16,  # Langevin step size rule: target signal-to-noise ratio
    progress: bool = False,  # show a tqdm progress bar
    sampler_options: dict | None = None,  # further options of the chosen sampler (e.g. {"variance": "fixed_large"})
    **cond,  # conditioning keyword arguments for model_fn(x, t, **cond)
) -> torch.Tensor:
    """Draw samples from ``model_fn`` with the named sampler; returns the final sample x_0 (VP scale = data).

    ``noise`` is x_T (unit Gaussian, shape (B, C, H, W)). With ``seed`` it serves as a template only (shape,
    dtype, device): x_T and every later draw of sample i come from its own generator, so an image depends on
    its seed, not on the batch it is drawn in.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    if not torch.is_tensor(noise):
        raise TypeError(f"noise must be a torch.Tensor of shape (B, C, ...), got {type(noise).__name__}")
    if noise.ndim < 2 or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating tensor of shape (B, C, ...), got {tuple(noise.shape)} {noise.dtype}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    T = diffusion.num_steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in 1..{T} (the training steps T), got {steps}")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    if init_image is None and strength != 1.0:
        raise ValueError("strength < 1 needs init_image (img2img)")
    if (mask is None) != (known is None):
        raise ValueError("inpainting needs both mask and known (or neither)")
    if resample_jumps < 0 or corrector_steps < 0:
        raise ValueError(f"resample_jumps and corrector_steps must be >= 0, got {resample_jumps}, {corrector_steps}")
    if resample_jumps and mask is None:
        raise ValueError("resample_jumps (RePaint) only acts with inpainting: pass mask and known")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond, the unconditional keyword arguments")
    fn = SAMPLERS[sampler]
    opts = _sampler_options(
        sampler, fn, eta=eta, set_alpha_to_one=set_alpha_to_one, resample_jumps=resample_jumps,
        corrector_steps=corrector_steps, snr=snr, extra=sampler_options,
    )
    if init_image is not None:
        init_image = _like("init_image", init_image, noise)
    if mask is not None:
        mask = _like("mask", mask, noise, channels_one=True)
        known = _like("known", known, noise)
        if mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = keep known)")

    # Grid; img2img runs only the last ceil(strength · steps) steps.
    ts = make_timesteps(diffusion, steps, spacing=spacing, offset=offset, karras=karras)
    if init_image is not None:
        keep = max(1, math.ceil(round(float(strength) * steps, 9)))
        ts = ts[-keep:]

    # Noise: sample i's x_T and all its fresh draws come from its own generator.
    gens = make_generators(seed, noise.shape[0])
    if gens is None and not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf (pass seed= to draw x_T from per-sample generators)")
    x = randn(noise, gens) if gens is not None else noise
    if init_image is not None:
        ab0 = float(alpha_bar(diffusion, ts[0]))
        x = ab0**0.5 * init_image + (1 - ab0) ** 0.5 * x  # q_sample at the first kept step

    # Conditioning and guidance, bound once: the samplers see model(x, t).
    net = model_fn
    if guidance_scale != 1.0:
        net = classifier_free_guidance(model_fn, guidance_scale, uncond, rescale=guidance_rescale)
    model = (lambda x_, t_: net(x_, t_, **cond)) if cond else (lambda x_, t_: net(x_, t_))

    project = _make_project(model, diffusion, ts, gens, mask, known, corrector_steps if sampler != "langevin" else 0, snr, clip_x0)
    if mask is not None:
        x = _inpaint(x, float(alpha_bar(diffusion, ts[0])), mask, known, gens)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ts), desc=sampler)

    def step_callback(i, t, x_, x0_):
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(i, t, x_, x0_)

    try:
        x = fn(model, x, ts, diffusion=diffusion, generator=gens, callback=step_callback, clip_x0=clip_x0, project=project, **opts)
    finally:
        if bar is not None:
            bar.close()
    if mask is not None:
        x = mask * known + (1 - mask) * x  # exactly the known image where mask = 1
    return x


def _inpaint(x: torch.Tensor, ab: float, mask, known, gens) -> torch.Tensor:
    """Replace the known region by the known image at noise level ᾱ: √ᾱ known + √(1 − ᾱ) z (RePaint eq. 8)."""
    known_t = known if ab >= 1.0 else ab**0.5 * known + (1 - ab) ** 0.5 * randn(x, gens)
    return mask * known_t + (1 - mask) * x


def _make_project(model, diffusion, ts, gens, mask, known, corrector_steps: int, snr: float, clip_x0: bool):
    """The project(x, ab_next) hook: Langevin corrector at the new level, then the inpainting paste."""
    if mask is None and corrector_steps == 0:
        return None
    grid_ab = alpha_bars(diffusion, ts)[:-1]
    grid_t = ts.tolist()

    def t_of(ab: float) -> float:
        for a, t in zip(grid_ab, grid_t):
            if abs(a - ab) <= 1e-9 * max(a, 1e-12):
                return t
        t = float(sigma_to_t(diffusion, ((1 - ab) / ab) ** 0.5))
        return float(round(t)) if abs(t - round(t)) < 1e-6 else t

    def project(x: torch.Tensor, ab_next) -> torch.Tensor:
        ab_next = float(ab_next)
        if corrector_steps and ab_next < 1.0:
            if mask is not None:
                x = _inpaint(x, ab_next, mask, known, gens)
            x = langevin_correct(model, x, t_of(ab_next), diffusion=diffusion, steps=corrector_steps, snr=snr, generator=gens, clip_x0=clip_x0)
        if mask is not None:
            x = _inpaint(x, ab_next, mask, known, gens)
        return x

    return project
