"""Small pure helpers that the samplers share: ᾱ at (possibly fractional) timesteps, σ ↔ t, and the denoiser.

Every sampler sees the process through ᾱ(t) only. Integer t reads the table; fractional t (Karras grids)
interpolates log σ linearly between neighbouring integer steps, as the Euler-family references do.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedules import karras_sigmas, sigmas_from_alphas_cumprod, timesteps as integer_timesteps


def _log_sigmas(diffusion) -> torch.Tensor:
    """log σ_t of every integer step, float64, computed once per process (cached on the diffusion object)."""
    cached = getattr(diffusion, "_log_sigmas_cache", None)
    if cached is None or cached[0] is not diffusion.alphas_cumprod:
        table = torch.log(torch.as_tensor(sigmas_from_alphas_cumprod(diffusion.alphas_cumprod.numpy())))
        cached = (diffusion.alphas_cumprod, table)
        diffusion._log_sigmas_cache = cached
    return cached[1]


def alpha_bar(diffusion, t) -> torch.Tensor:
    """ᾱ(t) as float64 for a float/int tensor or number t in [0, T-1]; t < 0 means "before the first step" (ᾱ = 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    log_sigma = _log_sigmas(diffusion)
    T = log_sigma.numel()
    tc = t.clamp(0, T - 1)
    lo = tc.floor().long()
    hi = (lo + 1).clamp(max=T - 1)
    w = tc - lo.double()
    ls = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
    out = 1.0 / (1.0 + torch.exp(2 * ls))  # ᾱ = 1/(1 + σ²)
    return torch.where(t < 0, torch.ones_like(out), out)


def sigma_to_t(diffusion, sigma) -> np.ndarray:
    """Fractional timestep whose interpolated log σ equals log ``sigma`` (inverse of :func:`alpha_bar`)."""
    log_sigmas = _log_sigmas(diffusion).numpy()
    s = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    return np.interp(s, log_sigmas, np.arange(log_sigmas.size, dtype=np.float64))


def make_timesteps(diffusion, steps: int, *, spacing: str = "leading", offset: int = 0, karras: bool = False, rho: float = 7.0) -> torch.Tensor:
    """Descending float64 timesteps at which a sampler calls the model.

    Without ``karras`` they are the integer grid of ``spacing``. With it, N σ values from the Karras grid
    between the schedule's σ_min and σ_max mapped back to (fractional) timesteps.
    """
    T = diffusion.num_steps
    if karras:
        sig = sigmas_from_alphas_cumprod(diffusion.alphas_cumprod.numpy())
        ks = karras_sigmas(float(sig[0]), float(sig[-1]), steps, rho)
        return torch.as_tensor(sigma_to_t(diffusion, ks), dtype=torch.float64)
    return torch.as_tensor(integer_timesteps(T, steps, spacing, offset), dtype=torch.float64)


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
    ab = expand(alpha_bar(diffusion, t), x)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if diffusion.prediction == "eps":
        eps = out
        x0 = (x - s * eps) / a
    elif diffusion.prediction == "x0":
        x0 = out
        eps = (x - a * x0) / s
    else:  # v
        x0 = a * x - s * out
        eps = s * x + a * out
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - a * x0) / s
    return x0, eps


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
    ab = alpha_bar(diffusion, torch.as_tensor(timesteps, dtype=torch.float64)).tolist()
    return [float(a) for a in ab] + [float(final)]


def renoise(x: torch.Tensor, ab_from: float, ab_to: float, generator=None) -> torch.Tensor:
    """Jump forward in the process from ᾱ_from to ᾱ_to ≤ ᾱ_from: q(x_to | x_from) = N(√(ᾱ_to/ᾱ_from) x, (1 − ᾱ_to/ᾱ_from) I).

    With ᾱ_from = ᾱ_{t-1} and ᾱ_to = ᾱ_t this is the forward step q(x_t | x_{t-1}) (DDPM eq. 2) that RePaint
    uses to resample (Lugmayr et al. 2022, Algorithm 1).
    """
    if ab_to > ab_from:
        raise ValueError(f"renoise goes towards more noise: need ab_to <= ab_from, got {ab_to} > {ab_from}")
    ratio = ab_to / ab_from
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * randn(x, generator)
