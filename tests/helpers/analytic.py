"""Exact answers for Gaussian data x_0 ~ N(m, s²) (per dimension), used by the sampler and bound tests.

For such data every quantity of the process is Gaussian and has a closed form:
- x_t ~ N(√ᾱ m, ᾱ s² + 1 − ᾱ), so the optimal denoiser is E[x_0 | x_t] = m + √ᾱ s² (x_t − √ᾱ m)/(ᾱ s² + 1 − ᾱ);
- the probability-flow ODE in σ-space (x_σ = x_t/√ᾱ = x_0 + σ ε) keeps (x_σ − m)/√(s² + σ²) constant,
  so from x at σ its end point is m + s (x_σ − m)/√(s² + σ²).
"""

from __future__ import annotations

import torch

from latentdiff.samplers.common import alpha_bar


def optimal_x0(x_t, ab, m, s):
    """E[x_0 | x_t] at ᾱ = ab (tensor broadcastable to x_t)."""
    return m + ab.sqrt() * s**2 * (x_t - ab.sqrt() * m) / (ab * s**2 + 1 - ab)


def gaussian_model_fn(diffusion, m: float, s: float):
    """The exact (Bayes-optimal) network for N(m, s²) data, in the process's parameterisation (ε, x_0 or v).

    Accepts integer or fractional t; with a learned variance it appends zeros (the mid-range variance).
    """

    def model_fn(x, t, **cond):
        ab = alpha_bar(diffusion, t.double().cpu()).to(x.device).to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        xd = x.double()
        x0 = optimal_x0(xd, ab, m, s)
        eps = (xd - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[diffusion.prediction].to(x.dtype)
        if getattr(diffusion, "learned_variance", False):
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    return model_fn


def ode_endpoint(x_start, ab_start, m: float, s: float):
    """Where the probability-flow ODE from x_start (VP scale, at ᾱ = ab_start) lands at σ = 0."""
    ab = torch.as_tensor(ab_start, dtype=torch.float64)
    sigma2 = (1 - ab) / ab
    x_sigma = x_start.double() / ab.sqrt()
    return m + s * (x_sigma - m) / torch.sqrt(s**2 + sigma2)
