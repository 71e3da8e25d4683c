"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), the B(h) = e^{−h} − 1 ("bh2") variant with the data prediction x̂_0, as diffusers' default.

Notation (paper -> code): α_t = √ᾱ_t -> alpha, σ_t = √(1 − ᾱ_t) -> sigma, λ_t = log(α_t/σ_t) -> lam,
h = λ_{i+1} − λ_i, r_k = (λ_{i−k} − λ_i)/h -> rks, D_k = (x̂_0^{(i−k)} − x̂_0^{(i)})/r_k -> D1s,
ρ^p (predictor) / ρ^c (corrector) -> rho_p / rho_c, the matrix R_p(h) and vector g_p(h) of the linear
system R ρ = g -> R, b.

Each step is the exponential-integrator update of DPM-Solver++ plus a weighted sum of divided differences:
    UniP-p:  x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h} − 1) x̂_0^{(i)} − α_{i+1} B(h) Σ_k ρ^p_k D_k
    UniC-p:  the same with the model output at the predicted x_{i+1} as one more point (r = 1),
             which raises the order by one at no extra model call: that output is reused by the next step.
With order p = 2 the predictor is DPM-Solver++(2M) (ρ^p = 1/2). The corrector replaces the state the
predictor produced (after ``edit_state`` was applied to it); the last step, to σ = 0, has no corrector.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .common import alpha_bars, check_timesteps, denoise
from .dpm_solver import log_snr_levels


def unipc_system(h: float, rks: list[float], order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """R_p (rows r^0..r^{p−1} over the points rks + [1]), g_p and B(h) for a step of size h (data prediction).

    g_k = k! · z φ_{k+1}(z) / B(h) with z = −h and φ_{k+1}(z) = (e^z − Σ_{j≤k} z^j/j!)/z^{k+1}.
    """
    z = -h
    B = math.expm1(z)  # bh2: B(h) = e^{−h} − 1
    points = list(rks) + [1.0]
    R = np.array([[r ** (k - 1) for r in points] for k in range(1, order + 1)], dtype=np.float64)  # (p, p)
    b, phi, factorial = [], math.expm1(z) / z - 1.0, 1.0  # phi = z φ_2(z)
    for k in range(1, order + 1):
        b.append(phi * factorial / B)
        factorial *= k + 1
        phi = phi / z - 1.0 / factorial  # z φ_{k+1}(z) -> z φ_{k+2}(z)
    return R, np.array(b, dtype=np.float64), B


@torch.no_grad()
def sample_unipc(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,  # unused (deterministic); accepted for the shared signature
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    order: int = 2,  # p of UniPC-p: the predictor's order; the corrector makes it p + 1 (diffusers: 2)
    lower_order_final: bool = True,  # order min(p, steps left) near the end (diffusers' default)
    disable_corrector: tuple = (),  # indices i of steps whose result is not corrected (diffusers' option)
) -> torch.Tensor:
    """UniPC-p of Zhao et al. 2023: multistep UniP predictor and UniC corrector, B(h) = e^{−h} − 1, data prediction."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    ts = check_timesteps(timesteps, diffusion)
    n = ts.numel()
    ab = alpha_bars(diffusion, ts)
    alpha, sigma, lam = log_snr_levels(ab)
    history: list[torch.Tensor] = []  # x̂_0 at earlier grid points, newest last
    pending = None  # what UniC needs to correct the state the last UniP produced
    for i, t in enumerate(ts.tolist()):
        x0, _ = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        # UniC: correct the state just reached with the model output at it (no extra model call).
        if pending is not None and (i - 1) not in disable_corrector:
            base, coef, D1s, rho_c, x0_prev = pending
            correction = sum((float(rho) * D for rho, D in zip(rho_c[:-1], D1s)), torch.zeros_like(x))
            x = base - coef * (correction + float(rho_c[-1]) * (x0 - x0_prev))
        history = (history + [x0])[-order:]
        if sigma[i + 1] == 0:
            # Last step, to the clean end: first order with λ = ∞ lands on x̂_0.
            x, pending = x0, None
        else:
            p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            D1s = [(history[-1 - k] - x0) / r for k, r in enumerate(rks, start=1)]
            R, b, B = unipc_system(h, rks, p)
            # UniP-p: exponential-integrator step plus the weighted divided differences.
            base = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * x0
            coef = alpha[i + 1] * B
            if p == 1:
                rho_p = []
            elif p == 2:
                rho_p = [0.5]  # the p = 2 predictor of the reference implementation (DPM-Solver++(2M))
            else:
                rho_p = np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            prediction = sum((float(rho) * D for rho, D in zip(rho_p, D1s)), torch.zeros_like(x))
            x = base - coef * prediction
            rho_c = [0.5] if p == 1 else np.linalg.solve(R, b).tolist()
            pending = (base, coef, D1s, rho_c, x0)
        if edit_state is not None:
            x = edit_state(x, ab[i + 1])
        if callback is not None:
            callback(i, t, x, x0)
    return x
