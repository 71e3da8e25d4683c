"""Annealed Langevin dynamics (Song & Ermon 2019) as a corrector, with the signal-to-noise step-size rule of
Song et al. 2021 (score SDE, Algorithms 4-5), and as a sampler of its own.

At noise level ᾱ_t (VP scale) the score is ∇ log p_t(x) = −ε̂/√(1 − ᾱ_t). One Langevin step is
x <- x + ε g + √(2ε) z with g the score, z ~ N(0, I) and ε = 2 α_t (r ‖z‖/‖g‖)², r the target SNR and
α_t = 1 − β_t. Departure from the reference code: the norms are taken per sample, not averaged over the
batch, so that an image depends on its own seed alone.
"""

from __future__ import annotations

import torch

from .common import alpha_bars, check_timesteps, denoise, randn


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v_i‖ over all but the batch dimension, shaped (B, 1, ..., 1)."""
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


@torch.no_grad()
def langevin_correct(
    model_fn, x: torch.Tensor, t: float, *, diffusion, steps: int, snr: float = 0.16, generator=None,
    clip_x0: bool = False,
) -> torch.Tensor:
    """``steps`` Langevin corrector steps at timestep t (score SDE Algorithm 5, VP corrector)."""
    if steps < 0:
        raise ValueError(f"corrector steps must be >= 0, got {steps}")
    if snr <= 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    ab = float(alpha_bars(diffusion, torch.tensor([float(t)]))[0])
    alpha = float(diffusion.alphas[int(round(float(t)))])  # α_t = 1 − β_t at the nearest training step
    for _ in range(steps):
        _, eps = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        grad = -eps / (1.0 - ab) ** 0.5  # score
        z = randn(x, generator)
        step = 2 * alpha * (snr * _per_sample_norm(z) / _per_sample_norm(grad).clamp_min(1e-12)) ** 2
        x = x + step * grad + (2 * step).sqrt() * z
    return x


@torch.no_grad()
def sample_langevin(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    corrector_steps: int = 2,  # Langevin steps at each noise level
    snr: float = 0.16,  # target signal-to-noise ratio of each step (score SDE uses 0.16 on CIFAR-10)
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over the levels of ``timesteps``, then
    one denoising step x̂_0 = E[x_0 | x_t] at the last level (Tweedie; Jolicoeur-Martineau et al. 2021).

    A corrector without a predictor: x is carried unchanged from one level to the next. It needs many
    levels or corrector steps to mix; it is here for completeness and as a reference.
    """
    if corrector_steps < 1:
        raise ValueError(f"the langevin sampler needs corrector_steps >= 1, got {corrector_steps}")
    ts = check_timesteps(timesteps, diffusion)
    grid = ts.tolist()
    ab_grid = alpha_bars(diffusion, ts, 1.0)
    for i, t in enumerate(grid):
        x = langevin_correct(
            model_fn, x, t, diffusion=diffusion, steps=corrector_steps, snr=snr, generator=generator, clip_x0=clip_x0
        )
        x0, _ = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        if i == len(grid) - 1:
            x = x0  # the final denoising step to ᾱ = 1
        if edit_state is not None:
            x = edit_state(x, ab_grid[i + 1])  # the level the next correction targets (1.0 at the end)
        if callback is not None:
            callback(i, t, x, x0)
    return x
