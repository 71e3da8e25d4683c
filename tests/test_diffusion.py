"""GaussianDiffusion: the closed forms of DDPM (Ho et al.), the conversions, continuous time, the losses and bad
input."""

import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion import GaussianDiffusion, q_posterior_coefficients, reverse_log_variance, x0_eps_from_output
from latentdiff.likelihood import discretized_gaussian_log_likelihood, normal_kl
from latentdiff.resample import LossSecondMomentSampler
from latentdiff.schedules import make_betas


def make(**kw):
    return GaussianDiffusion(make_betas(kw.pop("schedule", "linear"), kw.pop("T", 1000)), **kw)


def test_q_sample_closed_form_moments():
    d = make()
    n, t = 200_000, 300
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    xt = d.q_sample(x0, t)
    ab = float(d.alphas_cumprod[t])
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=4e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=1e-2)


def test_q_sample_matches_iterated_forward_steps():
    """x_t from the closed form has the law of t+1 single steps x_s = √(1−β_s) x_{s−1} + √β_s ε."""
    d = make(T=50)
    torch.manual_seed(1)
    x = x0 = torch.full((100_000, 1), -0.4, dtype=torch.float64)
    for s in range(20):
        x = math.sqrt(1 - float(d.betas[s])) * x + math.sqrt(float(d.betas[s])) * torch.randn_like(x)
    closed = d.q_sample(x0, 19)
    assert x.mean().item() == pytest.approx(closed.mean().item(), abs=5e-3)
    assert x.std().item() == pytest.approx(closed.std().item(), rel=1e-2)


def test_posterior_matches_ddpm_closed_form():
    d = make()
    x0, xt = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    mean, var, logvar = d.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        b, a = float(d.betas[ti]), 1 - float(d.betas[ti])
        ab, ab_prev = float(d.alphas_cumprod[ti]), float(d.alphas_cumprod[ti - 1])
        mu = math.sqrt(ab_prev) * b / (1 - ab) * x0[i] + math.sqrt(a) * (1 - ab_prev) / (1 - ab) * xt[i]  # eq. 7
        beta_tilde = (1 - ab_prev) / (1 - ab) * b
        torch.testing.assert_close(mean[i], mu, rtol=1e-12, atol=1e-12)
        assert var[i].flatten()[0].item() == pytest.approx(beta_tilde, rel=1e-12)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(beta_tilde), rel=1e-10)


def test_posterior_log_variance_clipped_at_t0():
    d = make()
    _, var, logvar = d.q_posterior(torch.zeros(1, 1), torch.zeros(1, 1), 0)
    assert var.item() == 0.0
    assert logvar.item() == pytest.approx(math.log(float(d.posterior_variance[1])))


def test_posterior_composed_with_q_sample_is_q_of_previous_step():
    """∫ q(x_{t-1}|x_t,x_0) q(x_t|x_0) dx_t = q(x_{t-1}|x_0): compare moments of the composition."""
    d = make()
    t, n = 400, 200_000
    x0 = torch.full((n, 1), 0.3, dtype=torch.float64)
    xt = d.q_sample(x0, t)
    mean, var, _ = d.q_posterior(x0, xt, t)
    x_prev = mean + var.sqrt() * torch.randn_like(mean)
    ab_prev = float(d.alphas_cumprod[t - 1])
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab_prev) * 0.3, abs=4e-3)
    assert x_prev.var().item() == pytest.approx(1 - ab_prev, rel=1.5e-2)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction):
    d = make(prediction=prediction, schedule="cosine")
    x0, eps = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randn(6, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    xt = d.q_sample(x0, t, eps)
    out = d.target(x0, eps, t)
    torch.testing.assert_close(d.predict_x0(out, xt, t), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d.predict_eps(out, xt, t), eps, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_shared_conversion_inverts_each_parameterisation(prediction):
    """x0_eps_from_output, the one conversion of diffusion.py and the samplers, recovers (x_0, ε) from the
    output of each kind at any level, and with clipping re-derives ε̂ from the clamped x̂_0."""
    x0, eps = 1.5 * torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64).reshape(3, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    got_x0, got_eps = x0_eps_from_output(prediction, out, x_t, a, s)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)
    clipped_x0, clipped_eps = x0_eps_from_output(prediction, out, x_t, a, s, clip_x0=True)
    assert clipped_x0.abs().max() <= 1 and x0.abs().max() > 1
    torch.testing.assert_close(a * clipped_x0 + s * clipped_eps, x_t, rtol=1e-9, atol=1e-9)


def test_posterior_helpers_match_the_tables_and_the_variance_choice():
    d = make(variance="learned_range")
    t = 300
    b, ab, ab_prev = float(d.betas[t]), float(d.alphas_cumprod[t]), float(d.alphas_cumprod[t - 1])
    coef_x0, coef_xt, beta_tilde = q_posterior_coefficients(b, ab, ab_prev)
    assert coef_x0 == pytest.approx(float(d.posterior_mean_coef1[t]), rel=1e-12)
    assert coef_xt == pytest.approx(float(d.posterior_mean_coef2[t]), rel=1e-12)
    assert beta_tilde == pytest.approx(float(d.posterior_variance[t]), rel=1e-12)
    lb, lbt = math.log(b), math.log(beta_tilde)
    assert reverse_log_variance("fixed_small", lb, lbt) == lbt and reverse_log_variance("fixed_large", lb, lbt) == lb
    v = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(reverse_log_variance("learned_range", lb, lbt, v),
                               torch.tensor([lbt, (lb + lbt) / 2, lb]))
    with pytest.raises(ValueError, match="doubled"):
        reverse_log_variance("learned", lb, lbt, None)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_continuous_alpha_bar_sigma_and_their_inverse(schedule):
    """ᾱ(t), σ(t) and t(σ) of the samplers: the table at integer t, σ² = (1 − ᾱ)/ᾱ, log σ linear between steps,
    t(σ(t)) = t, and the clean end before the first step."""
    d = make(schedule=schedule)
    t_int = torch.tensor([0.0, 1.0, 250.0, 998.0])
    torch.testing.assert_close(d.alpha_bar(t_int), d.alphas_cumprod[t_int.long()], rtol=1e-12, atol=0)
    t = torch.tensor([0.0, 0.25, 17.5, 420.9, 998.0])
    ab, sigma = d.alpha_bar(t), d.sigma(t)
    assert ab.dtype == sigma.dtype == torch.float64
    torch.testing.assert_close(sigma**2, (1 - ab) / ab, rtol=1e-9, atol=0)
    mid = d.sigma(torch.tensor(17.5))
    assert math.log(mid) == pytest.approx(0.5 * (math.log(d.sigma(17.0)) + math.log(d.sigma(18.0))), rel=1e-12)
    np.testing.assert_allclose(d.t_of_sigma(sigma.numpy()), t.numpy(), rtol=1e-9, atol=1e-9)
    assert float(d.alpha_bar(-1.0)) == 1.0 and float(d.sigma(-1.0)) == 0.0
    assert bool((torch.diff(d.alpha_bar(torch.linspace(0, 999, 4001))) < 0).all())


def test_learned_range_interpolates_log_variances():
    d = make(variance="learned_range")
    x = torch.randn(3, 2, 2, 2)
    t = torch.tensor([5, 5, 5])
    frac_vals = torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    out = torch.cat([torch.zeros_like(x), frac_vals], dim=1)
    p = d.p_mean_variance(out, x, t)
    lo, hi = float(d.posterior_log_variance_clipped[5]), math.log(float(d.betas[5]))
    assert p["log_variance"][0].flatten()[0].item() == pytest.approx(lo, rel=1e-5)
    assert p["log_variance"][1].flatten()[0].item() == pytest.approx(hi, rel=1e-5)
    assert p["log_variance"][2].flatten()[0].item() == pytest.approx((lo + hi) / 2, rel=1e-5)


def test_normal_kl_matches_numerical_integration():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(1.7)
    x = np.linspace(-12, 12, 200_001)
    p = np.exp(-((x - m1) ** 2) / (2 * math.exp(lv1))) / math.sqrt(2 * math.pi * math.exp(lv1))
    q = np.exp(-((x - m2) ** 2) / (2 * math.exp(lv2))) / math.sqrt(2 * math.pi * math.exp(lv2))
    numeric = np.trapezoid(p * np.log(p / q), x)
    kl = normal_kl(*[torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2)])
    assert kl.item() == pytest.approx(numeric, rel=1e-6)
    assert normal_kl(torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.1), torch.tensor(0.2)).item() == 0.0


def test_discretized_gaussian_matches_integration_and_sums_to_one():
    mean, std = 0.13, 0.05
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(levels, means=torch.tensor(mean, dtype=torch.float64),
                                               log_scales=torch.tensor(math.log(std), dtype=torch.float64))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # One middle bin against a direct integral of the density over it.
    k = 145
    lo, hi = levels[k].item() - 1 / 255, levels[k].item() + 1 / 255
    xs = np.linspace(lo, hi, 20_001)
    dens = np.exp(-((xs - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi))
    assert logp[k].exp().item() == pytest.approx(np.trapezoid(dens, xs), rel=1e-7)
    # Edge bins own the tails; far-away bins are finite (no log(0)).
    assert torch.isfinite(logp).all()


def _zero_model(channels_out):
    return lambda x, t, **_: torch.zeros(x.shape[0], channels_out, *x.shape[2:], dtype=x.dtype)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_simple_loss_is_mse_to_target(prediction):
    d = make(prediction=prediction)
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([3, 30, 300, 900])
    out = d.training_losses(_zero_model(3), x0, t, noise)
    expected = (d.target(x0, noise, t) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["loss"], expected)


def test_min_snr_weight():
    d = make(min_snr_gamma=5.0)
    x0, noise = torch.rand(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    t = torch.tensor([2, 900])  # high SNR (clipped) and low SNR (unclipped)
    out = d.training_losses(_zero_model(1), x0, t, noise)
    snr = d.snr(t)
    w = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    torch.testing.assert_close(out["loss"], (noise**2).mean(dim=(1, 2, 3)) * w.float())
    assert w[0] < 1 and w[1] == 1


def test_hybrid_loss_vlb_gradient_reaches_only_variance():
    d = make(variance="learned_range", loss="hybrid")
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    mean_param = torch.zeros(1, requires_grad=True)
    var_param = torch.zeros(1, requires_grad=True)

    def model_fn(x, t):
        return torch.cat([x * 0 + mean_param, x * 0 + var_param], dim=1)

    out = d.training_losses(model_fn, x0, torch.tensor([10, 200, 500, 800]))
    assert set(out) >= {"loss", "mse", "vlb"}
    out["vlb"].sum().backward()
    assert mean_param.grad is None or mean_param.grad.abs().item() == 0.0
    assert var_param.grad.abs().item() > 0


def test_importance_sampler_prefers_high_loss_steps():
    s = LossSecondMomentSampler(4, history=2, uniform_prob=0.0)
    for _ in range(2):
        s.update(torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 7.0]))
    p = s.probabilities()
    assert p[3] == pytest.approx(0.7)
    t, w = s.sample(10_000, generator=torch.Generator().manual_seed(0))
    assert (t == 3).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert w[t == 3][0].item() == pytest.approx(1 / (4 * 0.7), rel=1e-5)


def test_p_mean_variance_variants():
    for variance in ("fixed_small", "fixed_large"):
        d = make(variance=variance)
        x = torch.randn(2, 1, 3, 3)
        p = d.p_mean_variance(torch.zeros_like(x), x, torch.tensor([0, 500]))
        table = d.posterior_variance if variance == "fixed_small" else d.betas
        assert p["variance"][1].flatten()[0].item() == pytest.approx(float(table[500]), rel=1e-6)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda d: d.q_sample(torch.zeros(2, 1), torch.tensor([0, 1000])), ValueError, r"out of range.*0\.\.999"),
        (lambda d: d.q_sample(torch.zeros(2, 1), torch.tensor([-1, 3])), ValueError, "out of range"),
        (lambda d: d.q_sample(torch.zeros(2, 1), torch.tensor([0.5, 3.0])), TypeError, "integer timesteps"),
        (lambda d: d.q_sample(torch.zeros(2, 1), torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\)"),
        (lambda d: d.q_sample(torch.zeros(2, 3), 5, torch.zeros(2, 4)), ValueError, "noise has shape"),
        (lambda d: d.q_sample(torch.tensor([[0.0], [float("nan")]]), 5), ValueError, "x0 contains NaN"),
        (lambda d: d.q_posterior(torch.zeros(2, 3), torch.zeros(2, 2), 1), ValueError, "x0 has shape"),
        (lambda d: d.p_mean_variance(torch.zeros(2, 6, 2, 2), torch.zeros(2, 3, 2, 2), 1), ValueError,
         "model output has shape"),
        (lambda d: d.p_mean_variance(torch.full((1, 1), float("inf")), torch.zeros(1, 1), 1), ValueError,
         "model output contains NaN"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call(make())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        make(prediction="noise")
    with pytest.raises(ValueError, match="unknown variance"):
        make(variance="big")
    with pytest.raises(ValueError, match="unknown loss"):
        make(loss="l1")
    with pytest.raises(ValueError, match="betas must lie"):
        GaussianDiffusion([0.1, 2.0])
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        make(timestep_sampler="fancy")
