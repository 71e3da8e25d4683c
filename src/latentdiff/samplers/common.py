"""Small pure helpers that the samplers share: ᾱ at (possibly fractional) timesteps, σ ↔ t, and the denoiser.

Every sampler sees the process through ᾱ(t) only. Integer t reads the table; fractional t (Karras grids)
interpolates log σ linearly between neighbouring integer steps, as the Euler-family references do.
"""

from __future__ import annotations

import numpy as np
import torch

from ..schedules import karras_sigmas, sigmas_from_alphas_cumprod, timesteps as integer_timesteps


def alpha_bar(diffusion, t) -> torch.Tensor:
    """ᾱ(t) as float64 for a float/int tensor or number t in [0, T-1]; t < 0 means "before the first step" (ᾱ = 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    ac = diffusion.alphas_cumprod
    log_sigma = torch.log(torch.as_tensor(sigmas_from_alphas_cumprod(ac.numpy())))
    tc = t.clamp(0, ac.numel() - 1)
    lo = tc.floor().long()
    hi = (lo + 1).clamp(max=ac.numel() - 1)
    w = tc - lo.double()
    ls = (1 - w) * log_sigma[lo] + w * log_sigma[hi]
    out = 1.0 / (1.0 + torch.exp(2 * ls))  # ᾱ = 1/(1 + σ²)
    return torch.where(t < 0, torch.ones_like(out), out)


def sigma_to_t(diffusion, sigma) -> np.ndarray:
    """Fractional timestep whose interpolated log σ equals log ``sigma`` (inverse of :func:`alpha_bar`)."""
    log_sigmas = np.log(sigmas_from_alphas_cumprod(diffusion.alphas_cumprod.numpy()))
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
