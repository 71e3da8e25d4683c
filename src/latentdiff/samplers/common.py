"""Small pure helpers that the samplers share: ᾱ on a grid, the grid itself, the denoiser, noise.

Every sampler sees the process through ᾱ(t) only, the continuous ᾱ of :class:`GaussianDiffusion`: integer t
reads the table; fractional t (Karras grids) interpolates log σ between neighbouring integer steps.
"""

from __future__ import annotations

import torch

from ..diffusion import x0_eps_from_output
from ..schedules import karras_sigmas
from ..schedules import timesteps as integer_timesteps


def alpha_bar(diffusion, t) -> torch.Tensor:
    """ᾱ(t) of ``diffusion`` (:meth:`GaussianDiffusion.alpha_bar`) as float64; t < 0 means ᾱ = 1."""
    return diffusion.alpha_bar(t)


def make_timesteps(
    diffusion, steps: int, *, spacing: str = "leading", offset: int = 0, karras: bool = False, rho: float = 7.0,
    karras_range: str = "schedule", extra_point: bool = False,
) -> torch.Tensor:
    """Descending float64 timesteps at which a sampler calls the model.

    Without ``karras`` they are the integer grid of ``spacing``. With it, N σ values from the Karras grid
    (Karras et al. 2022, eq. 5) mapped back to (fractional) timesteps, between σ_min and σ_max of
    ``karras_range``: "schedule" (latentdiff's default) the schedule's ends σ(0) and σ(T−1); "grid" the σ of the
    smallest and largest timestep of the ``spacing`` grid (diffusers' Euler schedulers with use_karras_sigmas).

    ``extra_point``: the leading or linspace grid is built for N + 1 points and its smallest point dropped
    (diffusers' DPM-Solver and UniPC schedulers); a trailing grid is unchanged.
    """
    T = diffusion.num_steps
    if karras_range not in ("schedule", "grid"):
        raise ValueError(f"karras_range must be 'schedule' or 'grid', got {karras_range!r}")
    if extra_point and spacing != "trailing" and steps < T:
        ts = integer_timesteps(T, steps + 1, spacing, offset)[:-1]
    else:
        ts = integer_timesteps(T, steps, spacing, offset)
    if karras:
        sig = diffusion.sigmas
        lo, hi = float(sig[0]), float(sig[-1])
        if karras_range == "grid":
            lo, hi = float(diffusion.sigma(float(ts[-1]))), float(diffusion.sigma(float(ts[0])))
        ks = karras_sigmas(lo, hi, steps, rho)
        return torch.as_tensor(diffusion.t_of_sigma(ks), dtype=torch.float64)
    return torch.as_tensor(ts.copy(), dtype=torch.float64)


def expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) or scalar float64 tensor as (B, 1, ..., 1) in x's dtype and device."""
    v = torch.as_tensor(v, dtype=torch.float64).to(x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def model_t(t: float, x: torch.Tensor) -> torch.Tensor:
    """The timestep tensor handed to the model: long when t is integral, float otherwise; shape (B,)."""
    if float(t) == round(float(t)):
        return torch.full((x.shape[0],), int(round(float(t))), dtype=torch.long, device=x.device)
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def denoise(model_fn, x: torch.Tensor, t: float, diffusion, *, clip_x0: bool = False):
    """Call the network at (x_t, t) and return (x̂_0, ε̂), whatever it predicts (ε, x_0 or v).

    x is in the variance-preserving scale x_t = √ᾱ x_0 + √(1−ᾱ) ε. Learned-variance channels are dropped.
    With ``clip_x0`` x̂_0 is clamped to [-1, 1] and ε̂ re-derived from it (OpenAI's convention).
    """
    out = model_fn(x, model_t(t, x))
    c = x.shape[1]
    if out.shape[1] == 2 * c and getattr(diffusion, "learned_variance", False):
        out = out[:, :c]
    if out.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(out.shape)}; expected {tuple(x.shape)}")
    ab = expand(diffusion.alpha_bar(t), x)
    return x0_eps_from_output(diffusion.prediction, out, x, ab.sqrt(), (1 - ab).sqrt(), clip_x0=clip_x0)


def randn(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Unit Gaussian noise shaped like x. ``generator`` is None, one torch.Generator, or a list of one
    generator per sample, so that sample i's noise depends on its own generator alone (drawn on the CPU)."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator]).to(x.device)


# ---------------------------------------------------------------------------------------------------------
# Grid helpers shared by the DDPM / DDIM / PLMS / Langevin samplers and the entry point.


def check_timesteps(timesteps, diffusion) -> torch.Tensor:
    """Validate a sampling grid: non-empty, 1-D, finite, strictly descending, inside [0, T-1]; float64 copy."""
    ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if ts.ndim != 1 or ts.numel() < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(ts.shape)}")
    if not torch.isfinite(ts).all():
        raise ValueError("timesteps contain NaN or inf")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {ts.tolist()[:8]}...")
    T = diffusion.num_steps
    if float(ts.min()) < 0 or float(ts.max()) > T - 1:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {float(ts.min())}..{float(ts.max())}")
    return ts


def alpha_bars(diffusion, timesteps, final: float = 1.0) -> list[float]:
    """ᾱ at each grid point followed by the end level ``final`` (1.0 = clean data): N + 1 Python floats (float64)."""
    ab = diffusion.alpha_bar(torch.as_tensor(timesteps, dtype=torch.float64)).tolist()
    return [float(a) for a in ab] + [float(final)]


def renoise(x: torch.Tensor, ab_from: float, ab_to: float, generator=None) -> torch.Tensor:
    """Jump forward in the process from ᾱ_from to ᾱ_to ≤ ᾱ_from:
    q(x_to | x_from) = N(√(ᾱ_to/ᾱ_from) x, (1 − ᾱ_to/ᾱ_from) I).

    With ᾱ_from = ᾱ_{t-1} and ᾱ_to = ᾱ_t this is the forward step q(x_t | x_{t-1}) (DDPM eq. 2) that RePaint
    uses to resample (Lugmayr et al. 2022, Algorithm 1).
    """
    if ab_to > ab_from:
        raise ValueError(f"renoise goes towards more noise: need ab_to <= ab_from, got {ab_to} > {ab_from}")
    ratio = ab_to / ab_from
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * randn(x, generator)
