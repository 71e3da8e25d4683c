"""DDIM (Song, Meng & Ermon 2021): the non-Markovian sampler with η between the ODE (η = 0) and DDPM (η = 1),
and its inversion (clean image -> x_T along the same deterministic path).

Notation (paper -> code): α_t (the paper's α is our ᾱ) -> ab, α_{t-1} -> ab_prev, σ_t(η) -> sigma,
f_θ^{(t)}(x_t) (the predicted x_0) -> x0, ε_θ^{(t)}(x_t) -> eps.
"""

from __future__ import annotations

import torch

from ..diffusion import x0_eps_from_output
from .common import alpha_bars, check_timesteps, denoise, make_timesteps, randn, renoise


def ddim_sigma(ab: float, ab_prev: float, eta: float) -> float:
    """σ_t(η) = η √((1 − ᾱ_{t-1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t-1}) (DDIM eq. 16); 0 when the levels coincide."""
    if eta == 0 or ab_prev <= ab:
        return 0.0
    return eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, ab_prev: float, sigma: float = 0.0, noise=None) -> torch.Tensor:
    """x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ_t²) ε̂ + σ_t z (DDIM eq. 12)."""
    direction = max(1.0 - ab_prev - sigma**2, 0.0) ** 0.5  # "direction pointing to x_t"
    x = ab_prev**0.5 * x0 + direction * eps
    if noise is not None:
        x = x + sigma * noise
    return x


@torch.no_grad()
def sample_ddim(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    eta: float = 0.0,  # 0: deterministic (the probability-flow path); 1: DDPM's posterior variance
    set_alpha_to_one: bool = True,  # end at ᾱ = 1 (OpenAI); False ends at ᾱ_0 (CompVis / Stable Diffusion)
    resample_jumps: int = 0,  # RePaint: extra re-noise/denoise rounds per step (0 = off)
) -> torch.Tensor:
    """Generalised DDIM sampling along ``timesteps`` (DDIM eqs. 12 and 16).

    Fresh noise is drawn at every step when η > 0 (also where σ_t = 0), so that a generator's stream
    lines up step for step with other implementations.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if resample_jumps < 0:
        raise ValueError(f"resample_jumps must be >= 0, got {resample_jumps}")
    ts = check_timesteps(timesteps, diffusion)
    final = 1.0 if set_alpha_to_one else float(diffusion.alphas_cumprod[0])
    ab_grid = alpha_bars(diffusion, ts, final)
    n = ts.numel()
    for i, t in enumerate(ts.tolist()):
        ab, ab_prev = ab_grid[i], ab_grid[i + 1]
        sigma = ddim_sigma(ab, ab_prev, eta)
        x_t = x
        rounds = 1 + (resample_jumps if i < n - 1 else 0)
        for r in range(rounds):
            if r > 0:  # RePaint: back from ᾱ_{t-1} to ᾱ_t by the forward process, then step again
                x_t = renoise(x, ab_prev, ab, generator)
            x0, eps = denoise(model_fn, x_t, t, diffusion, clip_x0=clip_x0)
            noise = randn(x_t, generator) if eta > 0 else None
            x = ddim_step(x0, eps, ab_prev, sigma, noise)
            if edit_state is not None:
                x = edit_state(x, ab_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim_invert(
    model_fn,
    x0: torch.Tensor,
    *,
    diffusion,
    steps: int,
    spacing: str = "leading",
    offset: int = 0,
    karras: bool = False,
    timesteps=None,  # a descending grid to use instead of steps/spacing/offset/karras
    clip_x0: bool = False,
    set_alpha_to_one: bool = True,  # where x0 sits: ᾱ = 1, or ᾱ_0 as sample_ddim(set_alpha_to_one=False) ends
    refine: int = 0,  # fixed-point corrections per step (1 model call each); 0 = plain DDIM inversion
    callback=None,
) -> torch.Tensor:
    """DDIM inversion: run the deterministic update (eq. 12 with η = 0, the Euler step of the ODE eq. 14)
    from the clean end up the grid; returns x_T at ᾱ(timesteps[0]) in VP scale.

    Step k solves DDIM(x_k) = x_{k-1} for x_k: with ε = ε̂(x_k, t_k), x̂_0 = (x_{k-1} − √(1−ᾱ_{k-1}) ε)/√ᾱ_{k-1}
    and x_k = √ᾱ_k x̂_0 + √(1−ᾱ_k) ε. The plain inversion evaluates ε̂ at the known x_{k-1} (with the target
    timestep t_k); ``refine`` > 0 re-evaluates it at the new x_k, a fixed-point iteration that makes
    ``sample_ddim`` on the same grid return ``x0`` up to the iteration's residual instead of O(1/steps).
    ``callback(i, t, x, x0_hat)`` is called after each step with t the level just reached.
    """
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if timesteps is None:
        timesteps = make_timesteps(diffusion, steps, spacing=spacing, offset=offset, karras=karras)
    ts = check_timesteps(timesteps, diffusion).flip(0)  # ascending: from little noise to much
    start = 1.0 if set_alpha_to_one else float(diffusion.alphas_cumprod[0])
    ab_grid = [start] + alpha_bars(diffusion, ts)[:-1]  # ᾱ of the start, then of each grid point
    x = x0
    for i, t in enumerate(ts.tolist()):
        ab_from, ab_to = ab_grid[i], ab_grid[i + 1]
        x_to = x
        for _ in range(1 + refine):
            _, eps = denoise(model_fn, x_to, t, diffusion, clip_x0=clip_x0)
            x0_hat, _ = x0_eps_from_output("eps", eps, x, ab_from**0.5, (1 - ab_from) ** 0.5)  # at the known x_{k-1}
            x_to = ddim_step(x0_hat, eps, ab_to)
        x = x_to
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x
