"""The Euler family of Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models"): Euler, Euler ancestral and Heun steps of the probability-flow ODE in σ-space.

σ-space (the variance-exploding view): x_σ = x_t/√ᾱ_t = x_0 + σ ε with σ = √((1 − ᾱ)/ᾱ), so the ODE is
dx_σ/dσ = (x_σ − D(x_σ; σ))/σ (Karras et al.'s ODE with σ(t) = t), where D is the denoiser x̂_0. The network still
sees the VP-scale input x_σ/√(σ² + 1) at the timestep of σ. The samplers take x in VP scale at
timesteps[0] (x_σ = x/√ᾱ), end at σ = 0 where x_σ = x_0, and report VP-scale states (x_σ √ᾱ) to
``callback`` and ``edit_state``.

Notation (paper -> code): σ_i -> sig[i], D_θ -> x0 (from ``denoise``), d_i -> d, γ_i -> gamma,
σ̂ -> sigma_hat, S_churn / S_tmin / S_tmax / S_noise -> s_churn / s_tmin / s_tmax / s_noise.
"""

from __future__ import annotations

import math

import torch

from .common import alpha_bars, check_timesteps, denoise, randn


def vp_to_sigma_levels(ab: list[float]) -> list[float]:
    """σ = √((1 − ᾱ)/ᾱ) for each ᾱ (0 at the clean end ᾱ = 1); ᾱ = 0 (zero terminal SNR) has no finite σ."""
    if min(ab) <= 0:
        raise ValueError(
            "σ-space samplers need alpha_bar > 0 at every timestep (zero terminal SNR: drop the first step)"
        )
    return [((1.0 - a) / a) ** 0.5 for a in ab]


def churn(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """γ_i of Karras Algorithm 2: min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], else 0."""
    if s_churn <= 0 or not s_tmin <= sigma <= s_tmax:
        return 0.0
    return min(s_churn / num_steps, 2**0.5 - 1)


def ancestral_sigmas(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """σ_down, σ_up of an ancestral step: a deterministic step to σ_down, then noise σ_up, with
    σ_down² + σ_up² = σ_to² and σ_up² = σ_to² (σ_from² − σ_to²)/σ_from² (the DDPM posterior's variance in σ-space)."""
    if sigma_to == 0:
        return 0.0, 0.0
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _denoise_sigma(model_fn, x_sigma, sigma: float, t: float, diffusion, clip_x0: bool) -> torch.Tensor:
    """D(x_σ; σ): the network called on the VP-scale input x_σ/√(σ² + 1) at timestep t (the t of σ)."""
    x0, _ = denoise(model_fn, x_sigma / (sigma**2 + 1) ** 0.5, t, diffusion, clip_x0=clip_x0)
    return x0


def _perturb(x, sigma: float, gamma: float, s_noise: float, sigma_max: float, generator, diffusion):
    """Karras Algorithm 2, lines 5-6: raise the noise to σ̂ = σ(1 + γ) (at most the schedule's σ_max, where the
    network is defined) by adding fresh noise; returns x̂, σ̂ and the (fractional) timestep of σ̂."""
    sigma_hat = max(sigma, min(sigma * (1 + gamma), sigma_max))
    x = x + s_noise * max(sigma_hat**2 - sigma**2, 0.0) ** 0.5 * randn(x, generator)
    return x, sigma_hat, float(diffusion.t_of_sigma(sigma_hat))


@torch.no_grad()
def sample_euler(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    s_churn: float = 0.0,  # S_churn of Karras Algorithm 2; 0 = the deterministic ODE sampler
    s_tmin: float = 0.0,  # churn only where S_tmin ≤ σ ≤ S_tmax
    s_tmax: float = math.inf,
    s_noise: float = 1.0,  # S_noise: scale of the churn noise
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022, Algorithm 2 without the
    2nd-order correction)."""
    ts = check_timesteps(timesteps, diffusion)
    n = ts.numel()
    ab = alpha_bars(diffusion, ts)
    sig = vp_to_sigma_levels(ab)
    sigma_max = float(vp_to_sigma_levels([float(diffusion.alphas_cumprod[-1])])[0])
    x = x / ab[0] ** 0.5  # VP scale -> σ-space
    for i, t in enumerate(ts.tolist()):
        sigma, t_hat = sig[i], t
        gamma = churn(sigma, n, s_churn, s_tmin, s_tmax)
        if gamma > 0:  # lines 5-6: add noise up to σ̂
            x, sigma, t_hat = _perturb(x, sigma, gamma, s_noise, sigma_max, generator, diffusion)
        # Euler step: d = (x − D(x; σ̂))/σ̂, x ← x + (σ_{i+1} − σ̂) d.
        x0 = _denoise_sigma(model_fn, x, sigma, t_hat, diffusion, clip_x0)
        d = (x - x0) / sigma
        x = x + (sig[i + 1] - sigma) * d
        if edit_state is not None:
            x = edit_state(x * ab[i + 1] ** 0.5, ab[i + 1]) / ab[i + 1] ** 0.5
        if callback is not None:
            callback(i, t, x * ab[i + 1] ** 0.5, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
) -> torch.Tensor:
    """Euler ancestral sampling (Karras et al. 2022 / k-diffusion): an Euler step to σ_down, then fresh noise σ_up."""
    ts = check_timesteps(timesteps, diffusion)
    ab = alpha_bars(diffusion, ts)
    sig = vp_to_sigma_levels(ab)
    x = x / ab[0] ** 0.5  # VP scale -> σ-space
    for i, t in enumerate(ts.tolist()):
        sigma_down, sigma_up = ancestral_sigmas(sig[i], sig[i + 1])
        # Euler step of the ODE to σ_down.
        x0 = _denoise_sigma(model_fn, x, sig[i], t, diffusion, clip_x0)
        d = (x - x0) / sig[i]
        x = x + (sigma_down - sig[i]) * d
        # Ancestral noise back up to σ_{i+1} (none on the last step, where σ_{i+1} = 0).
        if sigma_up > 0:
            x = x + sigma_up * randn(x, generator)
        if edit_state is not None:
            x = edit_state(x * ab[i + 1] ** 0.5, ab[i + 1]) / ab[i + 1] ** 0.5
        if callback is not None:
            callback(i, t, x * ab[i + 1] ** 0.5, x0)
    return x


@torch.no_grad()
def sample_heun(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    s_churn: float = 0.0,  # S_churn of Karras Algorithm 2; 0 = Algorithm 1 (deterministic)
    s_tmin: float = 0.0,  # churn only where S_tmin ≤ σ ≤ S_tmax
    s_tmax: float = math.inf,
    s_noise: float = 1.0,  # S_noise: scale of the churn noise
    max_step_ratio: float = 10.0,  # no 2nd-order correction on a step with σ_i/σ_{i+1} above this (see below)
) -> torch.Tensor:
    """Heun's second-order method with optional churn, Algorithm 2 of Karras et al. 2022.

    The trapezoidal correction adds (σ_{i+1} − σ_i)(d_{i+1} − d_i)/2 to the Euler step. On a step that spans
    orders of magnitude in σ this term is the difference of two nearly equal slopes times a huge step: for
    N(m, s²) data it is ≈ σ_i s²/(2σ_{i+1}²), which on the cosine schedule's trailing grid (first step from
    σ ≈ 2·10⁴ to σ ≈ 6) swamps the image, while the Euler step from pure noise is accurate there (x̂_0 is
    nearly the data mean). So a step in the noise-dominated range (σ_{i+1} > 1, the scale of [-1, 1] data) with
    σ_i/σ_{i+1} > ``max_step_ratio`` stays an Euler step (one network call fewer). Karras grids and integer
    grids of the linear and scaled-linear schedules never come near the default 10 there (linear schedule,
    10 trailing steps: 2.5), so those runs are Algorithm 2 exactly; ``math.inf`` always corrects. (Near σ = 0
    large ratios are common, e.g. σ(100)/σ(0) on a leading grid, and harmless: the slopes agree there.)
    """
    ts = check_timesteps(timesteps, diffusion)
    n = ts.numel()
    ab = alpha_bars(diffusion, ts)
    sig = vp_to_sigma_levels(ab)
    sigma_max = float(vp_to_sigma_levels([float(diffusion.alphas_cumprod[-1])])[0])
    ts_list = ts.tolist()
    x = x / ab[0] ** 0.5  # VP scale -> σ-space
    for i, t in enumerate(ts_list):
        sigma, t_hat = sig[i], t
        gamma = churn(sigma, n, s_churn, s_tmin, s_tmax)
        if gamma > 0:  # lines 5-6: add noise up to σ̂
            x, sigma, t_hat = _perturb(x, sigma, gamma, s_noise, sigma_max, generator, diffusion)
        # Euler step (lines 7-8).
        x0 = _denoise_sigma(model_fn, x, sigma, t_hat, diffusion, clip_x0)
        d = (x - x0) / sigma
        x_next = x + (sig[i + 1] - sigma) * d
        # 2nd-order correction (lines 9-11), except on the last step to σ = 0 and on steps too long for it.
        too_long = sig[i + 1] > 1.0 and sigma > max_step_ratio * sig[i + 1]
        if sig[i + 1] != 0 and not too_long:
            x0_next = _denoise_sigma(model_fn, x_next, sig[i + 1], ts_list[i + 1], diffusion, clip_x0)
            d_next = (x_next - x0_next) / sig[i + 1]
            x_next = x + (sig[i + 1] - sigma) * (0.5 * d + 0.5 * d_next)
        x = x_next
        if edit_state is not None:
            x = edit_state(x * ab[i + 1] ** 0.5, ab[i + 1]) / ab[i + 1] ** 0.5
        if callback is not None:
            callback(i, t, x * ab[i + 1] ** 0.5, x0)
    return x
