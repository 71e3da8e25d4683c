"""Samplers: one function per algorithm (see the module of each) and the entry point :func:`sample`.

Every sampler has the signature
``sample_NAME(model_fn, x, timesteps, *, diffusion, generator=None, callback=None, clip_x0=False,
edit_state=None, **options)`` and returns the final sample. ``callback(i, t, x, x0_hat)`` observes each step;
``edit_state(x, ab_next) -> x`` replaces the state after each step, at its new noise level ᾱ_next.

:func:`sample` is a small core: the grid, the noise and per-sample generators, conditioning and
classifier-free guidance bound once, and the call, with each sampler's options passed by name
(:data:`SAMPLER_OPTIONS`). Its editing options (img2img, inpainting with RePaint resampling, the Langevin
corrector) live in :mod:`.editing` and reach the sampler as its start state and its ``edit_state`` hook.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import RequestError
from ..guidance import classifier_free_guidance
from .common import make_timesteps, randn
from .ddim import ddim_invert, sample_ddim
from .ddpm import sample_ddpm
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from .editing import Edits
from .euler import sample_euler, sample_euler_ancestral, sample_heun
from .langevin import sample_langevin
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

# The keyword options of each sampler beyond the shared signature: those that ``sample`` passes on (eta,
# set_alpha_to_one, resample_jumps, the langevin sampler's corrector_steps and snr) and that
# ``sampler_options`` may set by name.
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddpm": ("variance", "resample_jumps"),
    "ddim": ("eta", "set_alpha_to_one", "resample_jumps"),
    "plms": ("set_alpha_to_one", "combine"),
    "dpmpp_2m": (),
    "dpmpp_3m": ("lower_order_final", "exact_third_order"),
    "dpmpp_2m_sde": (),
    "unipc": ("order", "lower_order_final", "disable_corrector"),
    "euler": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
    "euler_ancestral": (),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise", "max_step_ratio"),
    "langevin": ("corrector_steps", "snr"),
}

RESAMPLING_SAMPLERS = tuple(name for name, opts in SAMPLER_OPTIONS.items() if "resample_jumps" in opts)  # RePaint

__all__ = ["SAMPLERS", "SAMPLER_OPTIONS", "sample", "options_for", "ddim_invert", "make_generators"] + [
    f.__name__ for f in SAMPLERS.values()
]


def _is_int(v) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def make_generators(seed, batch: int) -> list[torch.Generator] | None:
    """One CPU generator per sample: ``seed`` an int (sample i gets seed + i), a list of ints, or None."""
    if seed is None:
        return None
    if _is_int(seed):
        seeds = [int(seed) + i for i in range(batch)]
    elif isinstance(seed, (list, tuple)) and all(_is_int(s) for s in seed):
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for a batch of {batch}")
        seeds = [int(s) for s in seed]
    else:
        raise TypeError(f"seed must be None, an int or a list of ints, got {seed!r}")
    return [torch.Generator().manual_seed(s) for s in seeds]


def _check_request(sampler: str, noise, steps, num_steps: int, guidance_scale: float, uncond) -> None:
    """The core's own checks: a known sampler, a floating noise tensor, 1 <= steps <= T, guidance with uncond."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    if not torch.is_tensor(noise):
        raise TypeError(f"noise must be a torch.Tensor of shape (B, C, ...), got {type(noise).__name__}")
    if noise.ndim < 2 or not noise.is_floating_point():
        raise ValueError(
            f"noise must be a floating tensor of shape (B, C, ...), got {tuple(noise.shape)} {noise.dtype}"
        )
    if not _is_int(steps):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must lie in 1..{num_steps} (the training steps T), got {steps}")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond, the unconditional keyword arguments")


def options_for(name: str, *, eta=0.0, set_alpha_to_one=True, resample_jumps=0, corrector_steps=0, snr=0.16,
                extra: dict | None = None) -> dict:
    """The keyword options for sampler ``name`` (see :data:`SAMPLER_OPTIONS`) from those of :func:`sample`.

    An option the sampler does not take is an error when set (a RequestError), not ignored; ``extra`` sets its
    own options by name.
    """
    own = SAMPLER_OPTIONS[name]
    opts = {}
    if "eta" in own:
        opts["eta"] = eta
    elif eta != 0:
        raise RequestError(f"sampler {name!r} takes no eta (it is deterministic or has no η)")
    if "set_alpha_to_one" in own:
        opts["set_alpha_to_one"] = set_alpha_to_one
    elif not set_alpha_to_one:
        raise RequestError(f"set_alpha_to_one=False applies to ddim and plms only, not {name!r}")
    if resample_jumps:
        if "resample_jumps" not in own:
            raise RequestError(
                f"resample_jumps (RePaint) is implemented for {', '.join(RESAMPLING_SAMPLERS)} only, not {name!r}"
            )
        opts["resample_jumps"] = resample_jumps
    if "snr" in own:  # the langevin sampler is a corrector itself: it takes the corrector's options
        opts["snr"] = snr
    if "corrector_steps" in own and corrector_steps:
        opts["corrector_steps"] = corrector_steps
    for k, v in (extra or {}).items():
        if k not in own:
            raise TypeError(f"sampler {name!r} has no option {k!r}")
        opts[k] = v
    return opts


def _start_noise(noise: torch.Tensor, generators) -> torch.Tensor:
    """x_T: drawn from the per-sample generators when there are any (``noise`` is then a template), else ``noise``."""
    if generators is None:
        if not torch.isfinite(noise).all():
            raise ValueError("noise contains NaN or inf (pass seed= to draw x_T from per-sample generators)")
        return noise
    return randn(noise, generators)


def _bind(model_fn: Callable, cond: dict, guidance_scale: float, uncond, rescale: float) -> Callable:
    """Conditioning and classifier-free guidance bound once: the samplers see ``model(x, t)``."""
    net = model_fn
    if guidance_scale != 1.0:
        net = classifier_free_guidance(model_fn, guidance_scale, uncond, rescale=rescale)
    return (lambda x_, t_: net(x_, t_, **cond)) if cond else (lambda x_, t_: net(x_, t_))


def _run(name: str, model: Callable, x: torch.Tensor, ts: torch.Tensor, *, callback, progress: bool, **kwargs):
    """Call sampler ``name``, with a tqdm bar over its steps when ``progress``."""
    if not progress:
        return SAMPLERS[name](model, x, ts, callback=callback, **kwargs)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(ts), desc=name)

    def step_callback(i, t, x_, x0_):
        bar.update(1)
        if callback is not None:
            callback(i, t, x_, x0_)

    try:
        return SAMPLERS[name](model, x, ts, callback=step_callback, **kwargs)
    finally:
        bar.close()


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
    karras_range: str = "schedule",  # Karras grid ends: "schedule" σ(0)..σ(T-1), "grid" those of the spacing grid
    extra_point: bool = False,  # leading/linspace grid of steps + 1 points, smallest dropped (diffusers' multistep)
    init_noise: str = "vp",  # x_T: "vp" unit noise at ᾱ(t_0); "sigma" x_T = √(1 − ᾱ_0)·ε (diffusers' σ_max·ε)
    round_model_t: bool = False,  # the network sees round(t) on a Karras grid (diffusers' DPM-Solver, UniPC)
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
    _check_request(sampler, noise, steps, diffusion.num_steps, guidance_scale, uncond)
    edits = Edits.checked(noise, init_image=init_image, strength=strength, mask=mask, known=known,
                          resample_jumps=resample_jumps, corrector_steps=corrector_steps, snr=snr)
    opts = options_for(sampler, eta=eta, set_alpha_to_one=set_alpha_to_one, resample_jumps=resample_jumps,
                       corrector_steps=corrector_steps, snr=snr, extra=sampler_options)
    if init_noise not in ("vp", "sigma"):
        raise ValueError(f"init_noise must be 'vp' or 'sigma', got {init_noise!r}")
    grid = make_timesteps(diffusion, steps, spacing=spacing, offset=offset, karras=karras, karras_range=karras_range,
                          extra_point=extra_point)
    ts = edits.trim_grid(grid, steps)
    gens = make_generators(seed, noise.shape[0])
    x = _start_noise(noise, gens)
    if init_noise == "sigma" and init_image is None:
        # diffusers' Euler family on linspace/trailing grids: x_σ = σ_0·ε, i.e. x_T = σ_0/√(σ_0² + 1)·ε in VP scale.
        x = x * float(1 - diffusion.alpha_bar(ts[0])) ** 0.5
    model = _bind(model_fn, cond, guidance_scale, uncond, guidance_rescale)
    if round_model_t:
        inner = model
        model = lambda x_, t_: inner(x_, t_.round().long() if t_.is_floating_point() else t_)  # noqa: E731
    x = edits.start(x, diffusion, ts, gens)
    corrector = "corrector_steps" not in SAMPLER_OPTIONS[sampler]  # else the sampler runs the corrector itself
    edit_state = edits.state_editor(model, diffusion, ts, gens, clip_x0=clip_x0, corrector=corrector)
    x = _run(sampler, model, x, ts, callback=callback, progress=progress, diffusion=diffusion, generator=gens,
             clip_x0=clip_x0, edit_state=edit_state, **opts)
    return edits.finish(x)
