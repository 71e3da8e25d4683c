"""Small likelihood helpers for the variational bound: Gaussian KL and the discretized Gaussian decoder."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first (batch)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means, log_scales, bins: int = 256) -> torch.Tensor:
    """log p(x) for x on the grid of ``bins`` levels in [-1, 1] under N(means, e^{2 log_scales}).

    Each level owns the interval x ± 1/(bins − 1); the edge levels own everything beyond (DDPM Sec. 3.3,
    the decoder L_0). Uses the exact normal CDF (improved DDPM uses a tanh approximation of it).
    """
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scales)
    upper = (x - means + half) * inv_std
    lower = (x - means - half) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Φ(upper): the whole mass below, for x = -1
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower)): mass above, for x = 1
    # Middle bins: log(Φ(upper) − Φ(lower)), computed on the side of the mean where it is stable.
    flip = lower > 0
    a = torch.where(flip, -lower, upper)
    b = torch.where(flip, -upper, lower)
    log_cdf_a, log_cdf_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    log_mid = log_cdf_a + torch.log1p(-torch.exp(log_cdf_b - log_cdf_a).clamp(max=1 - 1e-12))
    lo_edge, hi_edge = -1.0 + 0.5 * half, 1.0 - 0.5 * half
    return torch.where(x < lo_edge, log_cdf_upper, torch.where(x > hi_edge, log_one_minus_cdf_lower, log_mid))
