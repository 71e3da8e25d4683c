"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): multistep solvers of the diffusion ODE and SDE written with the data prediction x̂_0.

Notation (paper -> code): α_t = √ᾱ_t -> alpha, σ_t = √(1 − ᾱ_t) -> sigma (the variance-preserving scale, not
the σ of the Euler family), λ_t = log(α_t/σ_t) (half the log-SNR) -> lam, h_i = λ_{t_i} − λ_{t_{i-1}} -> h,
x_θ(x_t, t) -> x0, r_i = h_{i-1}/h_i -> r.

The exact solution of the ODE from s to t is x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ(λ) dλ;
expanding x_θ in (λ − λ_s) and integrating each power gives, with φ = e^{−h} − 1,
    x_t = (σ_t/σ_s) x_s − α_t φ x̂_0 + α_t (φ/h + 1) h x̂_0' + α_t ((h²/2 − h + 1 − e^{−h})/h²) h² x̂_0'' + ...
where the multistep solvers estimate the derivatives from earlier x̂_0 (divided differences in λ).

The last step, to σ = 0 (λ = ∞), is always first order, where the update is exactly x̂_0; with fewer than 15
steps the 3M solver also drops to second order on the step before (diffusers' lower_order_final).
"""

from __future__ import annotations

import math

import torch

from .common import alpha_bars, check_timesteps, denoise, randn


def log_snr_levels(ab: list[float]) -> tuple[list[float], list[float], list[float]]:
    """α = √ᾱ, σ = √(1 − ᾱ) and λ = log(α/σ) for each ᾱ (λ = +inf where ᾱ = 1, −inf where ᾱ = 0)."""
    alpha = [a**0.5 for a in ab]
    sigma = [(1.0 - a) ** 0.5 for a in ab]
    lam = [math.inf if s == 0 else (-math.inf if a == 0 else math.log(a / s)) for a, s in zip(alpha, sigma)]
    return alpha, sigma, lam


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,  # unused (deterministic); accepted for the shared signature
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 (multistep, second order, data prediction)."""
    ts = check_timesteps(timesteps, diffusion)
    ab = alpha_bars(diffusion, ts)  # N + 1 levels, the last 1.0
    alpha, sigma, lam = log_snr_levels(ab)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts.tolist()):
        x0, _ = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        if sigma[i + 1] == 0:
            # Last step, to the clean end: first order with λ = ∞ lands on x̂_0.
            x, h = x0, math.inf
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                D = x0  # first step: DPM-Solver++(1), i.e. DDIM
            else:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # Algorithm 2: D_i
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * D
        x0_prev, h_prev = x0, h
        if edit_state is not None:
            x = edit_state(x, ab[i + 1])
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_3m(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,  # unused (deterministic); accepted for the shared signature
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    lower_order_final: bool = True,  # with < 15 steps, second order on the step before the last (diffusers)
    exact_third_order: bool = False,  # True: D2 with the Taylor factor 2, truly third order (see below)
) -> torch.Tensor:
    """DPM-Solver++(3M), the third-order multistep solver of Lu et al. 2022 (data prediction)."""
    # The reference code (Lu et al., diffusers, k-diffusion) weights D2 = (D1_0 − D1_1)/(r0 + r1) ≈ h² x̂_0''/2
    # by (h²/2 − h + 1 − e^{−h})/h², half the Taylor coefficient: the step is then second order
    # asymptotically (with a smaller constant than 2M). The default keeps the reference numbers;
    # exact_third_order doubles D2 and gives the third order the name promises.
    d2_weight = 2.0 if exact_third_order else 1.0
    ts = check_timesteps(timesteps, diffusion)
    n = ts.numel()
    ab = alpha_bars(diffusion, ts)
    alpha, sigma, lam = log_snr_levels(ab)
    history: list[tuple[torch.Tensor, float]] = []  # (x̂_0, h of the step it started), newest last
    for i, t in enumerate(ts.tolist()):
        x0, _ = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        if sigma[i + 1] == 0:
            # Last step, to the clean end: first order with λ = ∞ lands on x̂_0.
            x, h = x0, math.inf
        else:
            h = lam[i + 1] - lam[i]
            phi = math.expm1(-h)  # e^{−h} − 1
            order = min(3, i + 1)  # warm-up: first, then second order
            if lower_order_final and n < 15 and i == n - 2:
                order = min(order, 2)
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * phi) * x0  # first-order part
            if order >= 2:
                x0_1, h_1 = history[-1]
                r0 = h_1 / h
                D1_0 = (x0 - x0_1) / r0  # ≈ h x̂_0'
                if order == 2:
                    x = x - (0.5 * alpha[i + 1] * phi) * D1_0  # 2M
                else:
                    x0_2, h_2 = history[-2]
                    r1 = h_2 / h
                    D1_1 = (x0_1 - x0_2) / r1
                    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)  # ≈ h x̂_0' to second order
                    D2 = d2_weight * (D1_0 - D1_1) / (r0 + r1)  # ≈ h² x̂_0''/2 (reference) or h² x̂_0''
                    x = x + (alpha[i + 1] * (phi / h + 1)) * D1 - (alpha[i + 1] * ((phi + h) / h**2 - 0.5)) * D2
        history = (history + [(x0, h)])[-2:]
        if edit_state is not None:
            x = edit_state(x, ab[i + 1])
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
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
    """SDE-DPM-Solver++(2M) of Lu et al. 2022 (second-order multistep solver of the reverse SDE, data prediction)."""
    ts = check_timesteps(timesteps, diffusion)
    ab = alpha_bars(diffusion, ts)
    alpha, sigma, lam = log_snr_levels(ab)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts.tolist()):
        x0, _ = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        if sigma[i + 1] == 0:
            # Last step, to the clean end: e^{−h} = 0 and the noise vanishes; the update is x̂_0.
            x, h = x0, math.inf
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                D = x0  # first step: first order
            else:
                r = h_prev / h
                D = x0 + (x0 - x0_prev) / (2 * r)  # midpoint estimate, as in the ODE solver
            # Exact integration of the linear part of the SDE: contraction e^{−h}, injected noise 1 − e^{−2h}.
            one_minus_e2h = -math.expm1(-2 * h)
            x = (
                (sigma[i + 1] / sigma[i] * math.exp(-h)) * x
                + (alpha[i + 1] * one_minus_e2h) * D
                + (sigma[i + 1] * one_minus_e2h**0.5) * randn(x, generator)
            )
        x0_prev, h_prev = x0, h
        if edit_state is not None:
            x = edit_state(x, ab[i + 1])
        if callback is not None:
            callback(i, t, x, x0)
    return x
