"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2), on the full chain or respaced to fewer steps.

Respacing (Nichol & Dhariwal 2021, Sec. 4): keep the grid's ᾱ values and recompute the betas between kept
steps, β_i = 1 − ᾱ_i/ᾱ_{i-1}; the reverse step is then the posterior q(x_{i-1} | x_i, x̂_0) of that shorter
process, with the variance chosen by ``variance``. The posterior and the variance choice are those of
``latentdiff.diffusion`` (:func:`q_posterior_coefficients`, :func:`reverse_log_variance`).
"""

from __future__ import annotations

import math

import torch

from ..diffusion import VARIANCES, q_posterior_coefficients, reverse_log_variance
from .common import alpha_bars, check_timesteps, denoise, randn, renoise


def ddpm_log_variance(variance: str, beta: float, beta_tilde: float, learned: torch.Tensor | None):
    """log Σ of one (respaced) reverse step with β_t = ``beta`` and β̃_t = ``beta_tilde`` (both clamped at 1e-20
    before the log); ``learned`` holds the network's variance channels, or None. Returns a float or a tensor."""
    return reverse_log_variance(variance, math.log(max(beta, 1e-20)), math.log(max(beta_tilde, 1e-20)), learned)


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
    edit_state=None,
    variance: str | None = None,  # override diffusion.variance (e.g. fixed_large on a fixed_small model)
    resample_jumps: int = 0,  # RePaint: extra re-noise/denoise rounds per step (0 = off)
) -> torch.Tensor:
    """x_{t-1} = μ̃(x_t, x̂_0) + σ_t z, z ~ N(0, I), no noise on the last step (DDPM Algorithm 2, eqs. 7 and 11)."""
    variance = variance or diffusion.variance
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {', '.join(VARIANCES)}")
    if resample_jumps < 0:
        raise ValueError(f"resample_jumps must be >= 0, got {resample_jumps}")
    ts = check_timesteps(timesteps, diffusion)
    ab_grid = alpha_bars(diffusion, ts, 1.0)
    n, c = ts.numel(), x.shape[1]
    learned_out = {}

    def mean_fn(x_in, t_in):  # keeps the variance channels that denoise() drops
        out = model_fn(x_in, t_in)
        learned_out["v"] = out[:, c:] if out.shape[1] == 2 * c else None
        return out

    for i, t in enumerate(ts.tolist()):
        ab, ab_prev = ab_grid[i], ab_grid[i + 1]
        beta = 1.0 - ab / ab_prev  # respaced β_t
        coef_x0, coef_xt, beta_tilde = q_posterior_coefficients(beta, ab, ab_prev)  # DDPM eq. 7
        x_t = x
        last = i == n - 1
        rounds = 1 + (0 if last else resample_jumps)
        for r in range(rounds):
            if r > 0:  # RePaint: back to ᾱ_t through q(x_t | x_{t-1}), then step again
                x_t = renoise(x, ab_prev, ab, generator)
            x0, _ = denoise(mean_fn, x_t, t, diffusion, clip_x0=clip_x0)
            x = coef_x0 * x0 + coef_xt * x_t  # μ̃_t(x_t, x̂_0)
            if not last:
                log_var = ddpm_log_variance(variance, beta, beta_tilde, learned_out["v"])
                std = torch.exp(0.5 * log_var) if torch.is_tensor(log_var) else math.exp(0.5 * log_var)
                x = x + std * randn(x_t, generator)
            if edit_state is not None:
                x = edit_state(x, ab_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x
