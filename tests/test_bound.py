"""The variational bound is a bound: on 1-D Gaussian data quantised to 8 bits, with the exact denoiser.

For x_0 ~ N(m, s²) every reverse step has a closed form: E[x_0|x_t] (tests/helpers/analytic.py) and the true reverse
variance β̃_t + c_1² Var[x_0|x_t], c_1 = √ᾱ_{t-1} β_t/(1−ᾱ_t). With both, bits_per_dim is the model's NLL up to
noise; it can never be below the data's entropy H (cross-entropy ≥ entropy), and a wrong denoiser scores worse.
Data: all 256 levels weighted by their exact probability, so the only randomness is the noise of q_sample.
"""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.schedules import make_betas

M, S, R = 0.1, 0.3, 8  # data mean, std; noise draws per level


def _levels():
    levels = np.linspace(-1, 1, 256)
    edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    p = norm.cdf((edges[1:] - M) / S) - norm.cdf((edges[:-1] - M) / S)
    keep = p > 1e-7
    lv, pk = levels[keep], p[keep] / p[keep].sum()
    entropy = float(-(pk * np.log2(pk)).sum())
    x0 = torch.tensor(np.repeat(lv, R)).reshape(-1, 1)
    return x0, torch.tensor(pk), entropy


def _exact_model(d, shift=0.0):
    m = M + shift

    def model_fn(x, t):
        ab = d.alphas_cumprod[t].reshape(-1, 1)
        x0 = m + ab.sqrt() * S**2 * (x - ab.sqrt() * m) / (ab * S**2 + 1 - ab)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if d.variance != "learned":
            return eps
        c1 = d.posterior_mean_coef1[t].reshape(-1, 1)
        var_x0 = S**2 * (1 - ab) / (ab * S**2 + 1 - ab)
        log_var = torch.log(d.posterior_variance[t].reshape(-1, 1) + c1**2 * var_x0)
        return torch.cat([eps, log_var.expand_as(eps)], dim=1)

    return model_fn


def _bound(d, model_fn, x0, pk):
    calls = []
    r = d.bits_per_dim(model_fn, x0, progress=lambda i, n: calls.append((i, n)))
    assert calls[-1] == (d.num_steps, d.num_steps) and len(calls) == d.num_steps
    assert r["terms"].shape == (x0.shape[0], d.num_steps)
    torch.testing.assert_close(r["total"], r["terms"].sum(1) + r["prior"])
    per_level = r["total"].reshape(-1, R)
    est = float((per_level.mean(1) * pk).sum())
    se = math.sqrt(float((pk**2 * per_level.var(1) / R).sum()))
    return est, se


@pytest.mark.slow
def test_bound_is_tight_with_exact_model_and_worse_otherwise():
    torch.manual_seed(0)
    x0, pk, entropy = _levels()
    exact = GaussianDiffusion(make_betas("linear", 1000), variance="learned")
    est, se = _bound(exact, _exact_model(exact), x0, pk)
    assert est >= entropy - 3 * se, (est, entropy, se)  # a bound: never below the data's NLL
    assert est <= entropy + 0.05 + 3 * se, (est, entropy, se)  # and tight with the exact reverse process
    wrong, _ = _bound(exact, _exact_model(exact, shift=0.2), x0, pk)
    assert wrong > est + 0.2
    # DDPM's fixed small variance is a looser bound (β̃_t underestimates the true reverse variance).
    small = GaussianDiffusion(make_betas("linear", 1000), variance="fixed_small")
    loose, _ = _bound(small, _exact_model(small), x0, pk)
    assert loose > est + 0.3


def test_prior_term_is_small_for_the_linear_schedule():
    d = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    assert d.prior_bpd(x0).max().item() < 1e-4
    short = GaussianDiffusion(make_betas("linear", 10))
    assert short.prior_bpd(x0).min().item() > 1e-2  # 10 steps do not reach N(0, I)
