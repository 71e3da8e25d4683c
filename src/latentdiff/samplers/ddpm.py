"""Ancestral sampling of the seed (Ho et al. 2020, Algorithm 2), on the full chain or respaced to fewer steps.

Respacing (Nichol & Dhariwal 2021, Sec. 4): keep the grid's ᾱ values and recompute the betas between kept
steps, β_i = 1 − ᾱ_i/ᾱ_{i-1}; the reverse step is then the posterior q(x_{i-1} | x_i, x̂_0) of that shorter
process, with the variance chosen by ``variance``.
"""

from __future__ import annotations

import math

import torch

from ..diffusion import VARIANCES
from .common import alpha_bars, check_timesteps, denoise, randn, renoise


def ddpm_log_variance(variance: str, ab: float, ab_prev: float, learned: torch.Tensor | None):
    """log Σ of one reverse step from ᾱ_t = ``ab`` to ᾱ_{t-1} = ``ab_prev`` (DDPM Sec. 3.2; improved DDPM eq. 15).

    fixed_small: log β̃_t (β̃ clamped at 1e-20); fixed_large: log β_t; learned: the network's output;
    learned_range: frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2. Returns a float or a tensor.
    """
    beta = 1.0 - ab / ab_prev  # respaced β_t
    beta_tilde = max(beta * (1.0 - ab_prev) / (1.0 - ab), 1e-20)  # DDPM eq. 7
    if variance == "fixed_small":
        return math.log(beta_tilde)
    if variance == "fixed_large":
        return math.log(max(beta, 1e-20))
    if learned is None:
        raise ValueError(f"variance={variance!r} needs a model that outputs doubled (variance) channels")
    if variance == "learned":
        return learned
    frac = (learned + 1) / 2
    return frac * math.log(max(beta, 1e-20)) + (1 - frac) * math.log(beta_tilde)


@torch.no_grad()
def sample_ddpm(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    project=None,
    variance: str | None = None,  # override diffusion.variance (e.g. fixed_large on a fixed_small model)
    resample_jumps: int = 0,  # RePaint: extra re-noise/denoise rounds per step (0 = off)
) -> torch.Tensor:
    """x_{t-1} = μ̃(x_t, x̂_0) + σ_t z, z ~ N(0, I), with no noise on the last step (DDPM Algorithm 2, eqs. 7 and 11)."""
    variance = variance or diffusion.variance
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {', '.join(VARIANCES)}")
    if resample_jumps < 0:
        raise ValueError(f"resample_jumps must be >= 0, got {resample_jumps}")
    ts = check_timesteps(timesteps, diffusion)
    abs_ = alpha_bars(diffusion, ts, 1.0)
    n, c = ts.numel(), x.shape[1]
    learned_out = {}

    def mean_fn(x_in, t_in):  # keeps the variance channels that denoise() drops
        out = model_fn(x_in, t_in)
        learned_out["v"] = out[:, c:] if out.shape[1] == 2 * c else None
        return out

    for i, t in enumerate(ts.tolist()):
        ab, ab_prev = abs_[i], abs_[i + 1]
        beta = 1.0 - ab / ab_prev
        coef_x0 = ab_prev**0.5 * beta / (1.0 - ab)  # DDPM eq. 7, coefficient of x_0
        coef_xt = (1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab)  # coefficient of x_t
        x_t = x
        last = i == n - 1
        rounds = 1 + (0 if last else resample_jumps)
        for r in range(rounds):
            if r > 0:  # RePaint: back to ᾱ_t through q(x_t | x_{t-1}), then step again
                x_t = renoise(x, ab_prev, ab, generator)
            x0, _ = denoise(mean_fn, x_t, t, diffusion, clip_x0=clip_x0)
            x = coef_x0 * x0 + coef_xt * x_t  # μ̃_t(x_t, x̂_0)
            if not last:
                log_var = ddpm_log_variance(variance, ab, ab_prev, learned_out["v"])
                std = torch.exp(0.5 * log_var) if torch.is_tensor(log_var) else math.exp(0.5 * log_var)
                x = x + std * randn(x_t, generator)
            if project is not None:
                x = project(x, ab_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x
