"""Classifier-free guidance, inpainting (with RePaint resampling) and img2img through ``samplers.sample``."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.guidance import classifier_free_guidance
from latentdiff.samplers import SAMPLERS, sample
from latentdiff.samplers.common import alpha_bar, denoise, make_timesteps
from latentdiff.samplers.ddim import sample_ddim
from latentdiff.schedules import make_betas

from helpers.analytic import gaussian_model_fn, ode_endpoint, optimal_x0

BETAS = make_betas("linear", 1000)
NULL = 2  # the null class of the toy conditional model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def class_model(diffusion, means=(-0.5, 0.5, 0.0), s=0.3, calls=None):
    """Exact model of class-conditional Gaussian data: class y ~ N(means[y], s[y]²) (s a number or one per
    class); y = NULL is the 'unconditional' Gaussian. Records (batch, y) of each call in ``calls``."""
    table = torch.tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(s, dtype=torch.float64).expand(len(means))

    def f(x, t, *, y):
        if calls is not None:
            calls.append((x.shape[0], y.clone()))
        shape = (-1, *([1] * (x.ndim - 1)))
        ab = alpha_bar(diffusion, t.double()).reshape(shape)
        m = table[y].reshape(shape)
        x0 = optimal_x0(x.double(), ab, m, stds[y].reshape(shape))
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[diffusion.prediction]
        return out.to(x.dtype)

    return f


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    d = GaussianDiffusion(BETAS)
    f = class_model(d)
    x, t, y = torch.randn(4, 1, 3, 3), torch.tensor([10, 300, 600, 999]), torch.tensor([0, 1, 0, 1])
    null = {"y": torch.tensor([NULL])}  # batch 1: broadcast over the batch
    cond, unc = f(x, t, y=y), f(x, t, y=torch.full_like(y, NULL))
    torch.testing.assert_close(classifier_free_guidance(f, 1.0, null)(x, t, y=y), cond)
    torch.testing.assert_close(classifier_free_guidance(f, 0.0, null)(x, t, y=y), unc)
    torch.testing.assert_close(classifier_free_guidance(f, 3.0, null)(x, t, y=y), unc + 3.0 * (cond - unc))


def test_guidance_is_one_batched_pass():
    d = GaussianDiffusion(BETAS)
    calls = []
    f = class_model(d, calls=calls)
    y = torch.tensor([0, 1, 1])
    guided = classifier_free_guidance(f, 5.0, {"y": torch.full((3,), NULL)})
    guided(torch.randn(3, 1, 2, 2), torch.tensor([5, 5, 5]), y=y)
    assert len(calls) == 1
    assert calls[0][0] == 6 and calls[0][1].tolist() == [0, 1, 1, NULL, NULL, NULL]


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_guidance_gives_the_same_denoiser_for_every_parameterisation(prediction):
    """Weights (1 − s, s) sum to one, so guiding x_0 or v outputs gives the x̂_0 that guiding ε gives."""
    x, t, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), 400, torch.tensor([0, 1, 0, 1])
    x0s = []
    for pred in ("eps", prediction):
        d = GaussianDiffusion(BETAS, prediction=pred)
        g = classifier_free_guidance(class_model(d), 4.0, {"y": torch.tensor([NULL])})
        x0s.append(denoise(functools.partial(g, y=y), x, t, d)[0])
    torch.testing.assert_close(x0s[1], x0s[0], rtol=1e-9, atol=1e-9)


def test_guidance_keeps_conditional_learned_variance():
    def f(x, t, *, c):  # mean channel depends on c; variance channel = 10 c (distinguishes cond from uncond)
        return torch.cat([x * c.view(-1, 1, 1, 1), 10 * c.view(-1, 1, 1, 1).expand_as(x)], 1)

    x, t = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    out = classifier_free_guidance(f, 2.0, {"c": torch.zeros(2)})(x, t, c=torch.ones(2))
    torch.testing.assert_close(out[:, :1], 2.0 * x)  # 0 + 2 (x − 0)
    torch.testing.assert_close(out[:, 1:], torch.full_like(x, 10.0))


def test_guidance_rescale():
    d = GaussianDiffusion(BETAS)
    f = class_model(d, means=(-2.0, 2.0, 0.0), s=(0.3, 0.3, 1.0))  # guidance changes the output's std
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([500, 500, 900]), torch.tensor([0, 1, 0])
    null = {"y": torch.tensor([NULL])}
    plain = classifier_free_guidance(f, 7.0, null)(x, t, y=y)
    full = classifier_free_guidance(f, 7.0, null, rescale=1.0)(x, t, y=y)
    half = classifier_free_guidance(f, 7.0, null, rescale=0.5)(x, t, y=y)
    cond = f(x, t, y=y)
    std = lambda v: v.flatten(1).std(1)  # noqa: E731
    torch.testing.assert_close(std(full), std(cond))  # Lin et al. eq. 15: the guided std becomes the conditional one
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)  # eq. 16
    assert not torch.allclose(std(plain), std(cond))
    torch.testing.assert_close(classifier_free_guidance(f, 7.0, null, rescale=0.0)(x, t, y=y), plain)


def test_guidance_input_errors():
    f = lambda x, t, **c: x  # noqa: E731
    x, t = torch.randn(2, 1), torch.tensor([1, 1])
    with pytest.raises(TypeError, match="uncond must be a dict"):
        classifier_free_guidance(f, 2.0, None)
    with pytest.raises(ValueError, match="rescale must lie in"):
        classifier_free_guidance(f, 2.0, {}, rescale=2.0)
    with pytest.raises(ValueError, match="unmatched: \\['z'\\]"):
        classifier_free_guidance(f, 2.0, {"y": torch.zeros(2)})(x, t, y=torch.zeros(2), z=torch.zeros(2))
    with pytest.raises(ValueError, match="uncond\\['y'\\] has shape"):
        classifier_free_guidance(f, 2.0, {"y": torch.zeros(2, 3)})(x, t, y=torch.zeros(2, 4))


def test_sample_with_guidance_pushes_towards_the_class():
    """Guidance scale s on two Gaussians of means ±0.5 (null class: mean 0) gives, for the ODE, samples of
    mean ≈ s·m_c (ε is affine in the mean): s = 2 doubles the class mean."""
    d = GaussianDiffusion(BETAS)
    f = class_model(d)
    y = torch.tensor([1] * 64)
    kw = dict(diffusion=d, sampler="ddim", steps=50, seed=0, y=y)
    plain = sample(f, torch.empty(64, 1, 2, 2), **kw)
    guided = sample(f, torch.empty(64, 1, 2, 2), guidance_scale=2.0, uncond={"y": torch.tensor([NULL])}, **kw)
    assert abs(plain.mean().item() - 0.5) < 0.05
    assert abs(guided.mean().item() - 1.0) < 0.1


# ---------------------------------------------------------------------------------------------------------
# Inpainting


def _inpaint_inputs(b=4, c=2, h=6, w=6):
    known = torch.rand(b, c, h, w) * 2 - 1
    mask = torch.zeros(1, 1, h, w)
    mask[..., :, : w // 2] = 1  # keep the left half
    return known, mask


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inpainting_keeps_known_region_exactly(name):
    d = GaussianDiffusion(BETAS)
    known, mask = _inpaint_inputs()
    kw = {"corrector_steps": 1} if name == "langevin" else {}
    x = sample(gaussian_model_fn(d, 0.5, 0.3), torch.empty_like(known), diffusion=d, sampler=name, steps=6, seed=1,
               known=known, mask=mask, **kw)
    keep = mask.expand_as(known).bool()
    assert torch.equal(x[keep], known[keep])
    assert (x[~keep] - known[~keep]).abs().mean() > 0.1  # the rest is generated


def test_inpainting_known_region_is_noised_during_sampling():
    """After each step the known region is √ᾱ known + √(1 − ᾱ) z at the new level (RePaint eq. 8)."""
    d = GaussianDiffusion(BETAS)
    known, mask = _inpaint_inputs(b=64)
    known = torch.full_like(known, 0.8)
    seen = []
    sample(gaussian_model_fn(d, 0.0, 0.5), torch.empty_like(known), diffusion=d, sampler="ddim", steps=10, seed=0,
           known=known, mask=mask, callback=lambda i, t, x, x0: seen.append(x[:, :, :, :3].clone()))
    ts = make_timesteps(d, 10)
    for i in (2, 5):
        ab = float(alpha_bar(d, ts[i + 1]))
        region = seen[i]
        assert abs(region.mean().item() - math.sqrt(ab) * 0.8) < 0.05
        assert abs(region.std().item() - math.sqrt(1 - ab)) < 0.05


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_repaint_resampling(name):
    d = GaussianDiffusion(BETAS)
    known, mask = _inpaint_inputs()
    calls = []
    base = gaussian_model_fn(d, 0.5, 0.3)

    def f(x, t):
        calls.append(1)
        return base(x, t)

    kw = dict(diffusion=d, sampler=name, steps=5, seed=2, known=known, mask=mask)
    once = sample(f, torch.empty_like(known), **kw)
    n_plain = len(calls)
    again = sample(f, torch.empty_like(known), resample_jumps=2, **kw)
    assert n_plain == 5 and len(calls) - n_plain == 5 + 2 * 4  # 2 extra rounds on every step but the last
    keep = mask.expand_as(known).bool()
    assert torch.equal(again[keep], known[keep])
    assert (again[~keep] - once[~keep]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# img2img


def test_img2img_runs_the_last_steps_from_the_noised_image():
    d = GaussianDiffusion(BETAS)
    m, s = 0.5, 0.3
    f = gaussian_model_fn(d, m, s)
    init = torch.full((4, 1, 3, 3), 0.9, dtype=torch.float64)
    seen = []
    x = sample(f, torch.empty_like(init), diffusion=d, sampler="ddim", steps=100, seed=5, init_image=init, strength=0.3,
               callback=lambda i, t, x_, x0: seen.append(t))
    ts = make_timesteps(d, 100)
    assert seen == ts[-30:].tolist()  # ceil(0.3 · 100) = 30 steps
    # The start is q_sample(init, t_start) with the seed's noise; DDIM then follows the ODE from there.
    g = [torch.Generator().manual_seed(5 + i) for i in range(4)]
    eps = torch.stack([torch.randn(init.shape[1:], generator=gi, dtype=init.dtype) for gi in g])
    ab = alpha_bar(d, ts[-30])
    start = ab.sqrt() * init + (1 - ab).sqrt() * eps
    torch.testing.assert_close(x, sample_ddim(f, start, ts[-30:], diffusion=d), rtol=1e-12, atol=1e-12)
    err = (x - ode_endpoint(start, ab, m, s)).abs()
    assert err.mean() < 0.02 and err.max() < 0.05  # DDIM's first-order error over 30 steps
    # Tiny strength: one step at the cleanest grid point, the image comes back nearly unchanged.
    y = sample(f, torch.empty_like(init), diffusion=d, sampler="ddim", steps=100, seed=5, init_image=init,
               strength=0.001)
    assert (y - init).abs().max() < 0.02


def test_img2img_with_every_sampler():
    d = GaussianDiffusion(BETAS)
    init = torch.zeros(2, 1, 2, 2)
    for name in sorted(SAMPLERS):
        kw = {"corrector_steps": 1} if name == "langevin" else {}
        x = sample(gaussian_model_fn(d, 0.5, 0.3), torch.empty_like(init), diffusion=d, sampler=name, steps=10, seed=0,
                   init_image=init, strength=0.5, **kw)
        assert x.shape == init.shape and torch.isfinite(x).all(), name
