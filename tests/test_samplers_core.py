"""DDPM, DDIM (+ inversion), PLMS, Langevin, and the entry point ``samplers.sample``.

Exact answers on Gaussian data N(M, S²) (tests/helpers/analytic.py): the data's mean and variance, the end point of
the probability-flow ODE and DDIM's first-order convergence to it. Parity with diffusers' DDIMScheduler,
PNDMScheduler(skip_prk_steps=True) and DDPMScheduler, step by step on the same model function, the same x_T
and the same noise draws. Reproducibility per seed, and clear errors on bad input.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.samplers import SAMPLER_OPTIONS, SAMPLERS, ddim_invert, sample
from latentdiff.samplers.common import alpha_bar, make_timesteps
from latentdiff.samplers.ddim import sample_ddim
from latentdiff.samplers.ddpm import sample_ddpm
from latentdiff.samplers.plms import sample_plms
from latentdiff.schedules import make_betas

from helpers.analytic import gaussian_model_fn, ode_endpoint

M, S = 0.5, 0.3
BETAS = make_betas("linear", 1000)
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (10x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _diffusion(**kw):
    return GaussianDiffusion(BETAS, **kw)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------------------
# Moments of the samples: mean M and std S of the data.

MOMENT_CASES = [
    # (sampler, steps, diffusion kwargs, sample() kwargs, std tolerance); 64 x 64 = 4096 independent values.
    # DDPM and DDIM are first order: their std is still ~2% low at 1000 steps; those two runs are slow.
    pytest.param("ddpm", 1000, {"variance": "fixed_small"}, {}, 0.02, marks=pytest.mark.slow),
    ("ddpm", 250, {"variance": "fixed_large"}, {}, 0.02),
    ("ddpm", 250, {"variance": "learned_range"}, {}, 0.02),
    pytest.param("ddim", 1000, {}, {}, 0.02, marks=pytest.mark.slow),
    ("plms", 50, {"prediction": "v"}, {}, 0.02),
    # Unadjusted Langevin inflates the std by 1/sqrt(1 - snr^2) (2% at snr 0.2) and mixes slowly.
    ("langevin", 10, {}, {"corrector_steps": 40, "snr": 0.2}, 0.03),
]


@pytest.mark.parametrize("name,steps,dkw,skw,tol", MOMENT_CASES)
def test_samples_have_data_moments(name, steps, dkw, skw, tol):
    d = _diffusion(**dkw)
    x = sample(gaussian_model_fn(d, M, S), torch.randn(64, 1, 8, 8), diffusion=d, sampler=name, steps=steps, **skw)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - M) < 0.02, x.mean().item()
    assert abs(x.std().item() - S) < tol, x.std().item()


def test_langevin_corrector_moves_ddim_towards_the_data():
    """Predictor-corrector (score SDE Algorithm 1-style): a DDIM predictor with a Langevin corrector after each
    step lands closer to the data's variance than DDIM alone at the same (coarse) grid."""
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    noise = torch.randn(256, 1, 8, 8)
    plain = sample(f, noise, diffusion=d, sampler="ddim", steps=20)
    corrected = sample(f, noise, diffusion=d, sampler="ddim", steps=20, corrector_steps=2, snr=0.16)
    assert abs(corrected.std().item() - S) < 0.6 * abs(plain.std().item() - S)
    assert abs(corrected.mean().item() - M) < 0.02


# ---------------------------------------------------------------------------------------------------------
# DDIM: the ODE end point, first order, inversion.


def test_ddim_converges_to_ode_endpoint_first_order():
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    x_T = torch.randn(512, 1, dtype=torch.float64)
    ns, errs = [10, 20, 40, 80], []
    for n in ns:
        ts = make_timesteps(d, n, spacing="trailing")  # every grid starts at t = T-1
        x = sample_ddim(f, x_T, ts, diffusion=d)
        errs.append((x - ode_endpoint(x_T, alpha_bar(d, ts[0]), M, S)).abs().mean().item())
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert -1.2 < slope < -0.8, (slope, errs)
    assert errs[-1] < 0.02


def test_ddim_invert_then_sample_gives_back_x0():
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    x0 = M + S * torch.randn(512, 1, dtype=torch.float64)
    path_err, back_err = [], []
    for steps in (25, 100):
        x_T = ddim_invert(f, x0, diffusion=d, steps=steps)
        ts = make_timesteps(d, steps)
        # x_T approaches the exact ODE path of x0: x_σ = M + (x0 − M) √(S² + σ²)/S, at first order.
        ab = alpha_bar(d, ts[0])
        exact_T = ab.sqrt() * (M + (x0 - M) * torch.sqrt(S**2 + (1 - ab) / ab) / S)
        path_err.append(((x_T - exact_T).abs().mean() / exact_T.abs().mean()).item())
        back_err.append((sample_ddim(f, x_T, ts, diffusion=d) - x0).abs().max().item())
    assert path_err[1] < 0.06 and path_err[1] < path_err[0] / 3, path_err
    assert back_err[1] < 0.1 and back_err[1] < back_err[0] / 3, back_err
    # Fixed-point refinement solves each inverse step: the round trip is exact up to its residual.
    ts = make_timesteps(d, 50)
    x_T = ddim_invert(f, x0, diffusion=d, steps=50, refine=3)
    assert (sample_ddim(f, x_T, ts, diffusion=d) - x0).abs().max().item() < 1e-3


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers, step by step.

diffusers = pytest.importorskip("diffusers")


def _diffusers_loop(sch, d, f, x_T, step_kwargs=None):
    """Run a diffusers scheduler in float64 on our ᾱ table (diffusers keeps float32 tables whose cumprod differs
    from ours by ~1e-6, amplified ~100x near t = T-1): what is compared is the step math alone."""
    sch.alphas_cumprod = d.alphas_cumprod.clone()
    if hasattr(sch, "final_alpha_cumprod"):
        final = 1.0 if sch.config.set_alpha_to_one else float(d.alphas_cumprod[0])
        sch.final_alpha_cumprod = torch.tensor(final, dtype=torch.float64)
    if hasattr(sch, "one"):
        sch.one = torch.tensor(1.0, dtype=torch.float64)
    x = x_T.clone()
    for t in sch.timesteps:
        t_in = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x = sch.step(f(x, t_in), int(t), x, **(step_kwargs or {})).prev_sample
    return x


DDIM_CASES = [
    # (spacing, offset, set_alpha_to_one, eta, clip, prediction)
    ("leading", 0, True, 0.0, False, "eps"),
    ("leading", 1, False, 0.0, False, "eps"),
    ("leading", 1, True, 0.0, False, "v"),
    ("trailing", 0, True, 0.0, False, "eps"),
    ("trailing", 0, False, 0.0, False, "x0"),
    ("linspace", 0, True, 0.0, False, "eps"),
    ("leading", 0, True, 1.0, False, "eps"),
    ("leading", 1, False, 0.5, True, "eps"),
]


@pytest.mark.parametrize("spacing,offset,one,eta,clip,prediction", DDIM_CASES)
def test_ddim_matches_diffusers(spacing, offset, one, eta, clip, prediction):
    d = _diffusion(prediction=prediction)
    f = gaussian_model_fn(d, M, 0.8 if clip else S)  # wide data so that clipping x̂_0 happens
    n = 10
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=one,
        steps_offset=offset, timestep_spacing=spacing, prediction_type=PRED[prediction],
    )
    sch.set_timesteps(n)
    if spacing == "linspace":
        # diffusers steps to t − T//N whatever the grid (reference-conventions.md); this grid is uniform with
        # stride 111 = 1000 // 9, so setting N = 9 for that formula makes it hit our grid-lookup neighbours.
        sch.num_inference_steps = 9
    ts = make_timesteps(d, n, spacing=spacing, offset=offset)
    assert ts.long().tolist() == sch.timesteps.tolist()
    x_T = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = sample_ddim(f, x_T, ts, diffusion=d, eta=eta, set_alpha_to_one=one, clip_x0=clip, generator=g_ours)
    ref = _diffusers_loop(sch, d, f, x_T, {"eta": eta, "use_clipped_model_output": clip, "generator": g_ref})
    assert _rel(ours, ref) < 1e-9


@pytest.mark.parametrize("spacing,offset,one",
                         [("leading", 0, True), ("leading", 1, False), ("trailing", 0, False), ("leading", 0, False)])
@pytest.mark.parametrize("n", [1, 2, 10])
def test_plms_matches_pndm_skip_prk(spacing, offset, one, n):
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    sch = diffusers.PNDMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", skip_prk_steps=True, set_alpha_to_one=one,
        steps_offset=offset, timestep_spacing=spacing,
    )
    sch.set_timesteps(n)
    ts = make_timesteps(d, n, spacing=spacing, offset=offset)
    calls = []

    def counted(x, t):
        calls.append(int(t[0]))
        return f(x, t)

    x_T = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    ours = sample_plms(counted, x_T, ts, diffusion=d, set_alpha_to_one=one)
    ref = _diffusers_loop(sch, d, f, x_T)
    assert calls == sch.timesteps.tolist()  # N + 1 calls (N for N = 1), at the same timesteps
    assert _rel(ours, ref) < 1e-9


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_plms_is_the_same_for_every_parameterisation(prediction):
    """PLMS combines ε predictions (PNDM eq. 12), so an x_0 or v network with the same denoiser gives the same
    samples as the ε network. (diffusers' PNDMScheduler combines raw v outputs instead; it differs for v.)"""
    x_T = torch.randn(16, 2, 4, 4)
    ts = make_timesteps(_diffusion(), 10)
    runs = [sample_plms(gaussian_model_fn(d, M, S), x_T, ts, diffusion=d)
            for d in (_diffusion(), _diffusion(prediction=prediction))]
    assert _rel(runs[1], runs[0]) < 1e-5


@pytest.mark.parametrize("variance,n,T", [("fixed_small", 20, 1000), ("fixed_large", 20, 1000),
                                         ("learned_range", 20, 1000), ("fixed_large", 100, 100),
                                         ("fixed_small", 100, 100)])
def test_ddpm_matches_diffusers(variance, n, T):
    """Respaced (n < T) and full-chain (n = T) ancestral sampling with the same noise draws."""
    d = GaussianDiffusion(make_betas("linear", T), variance=variance)
    base = gaussian_model_fn(d, M, S)

    def f(x, t):  # a non-trivial learned variance output v = 0.8 tanh(x)
        out = base(x, t)
        return torch.cat([out[:, :2], 0.8 * torch.tanh(x)], 1) if d.learned_variance else out

    sch = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                                  variance_type=variance)
    sch.set_timesteps(n)
    ts = make_timesteps(d, n)
    assert ts.long().tolist() == sch.timesteps.tolist()
    x_T = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = sample_ddpm(f, x_T, ts, diffusion=d, generator=g_ours)
    ref = _diffusers_loop(sch, d, f, x_T, {"generator": g_ref})
    assert _rel(ours, ref) < 1e-9
    # The same noise was drawn: a different generator seed gives a different sample.
    other = sample_ddpm(f, x_T, ts, diffusion=d, generator=torch.Generator().manual_seed(4))
    assert _rel(other, ref) > 1e-2


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_on_the_full_chain_is_the_diffusions_reverse_process(variance):
    """On the full grid the sampler's posterior step (its own ᾱ, respacing formulas and variance choice) is
    GaussianDiffusion.p_mean_variance: mean + exp(½ log Σ) z with the same draws, no noise at t = 0."""
    T = 30
    d = GaussianDiffusion(make_betas("linear", T, rescale=True), variance=variance)
    base = gaussian_model_fn(d, M, S)

    def f(x, t):
        out = base(x, t)
        return torch.cat([out[:, :2], 0.8 * torch.tanh(x)], 1) if d.learned_variance else out

    x_T = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    ours = sample_ddpm(f, x_T, make_timesteps(d, T), diffusion=d, generator=torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(5), x_T
    for t in range(T - 1, -1, -1):
        p = d.p_mean_variance(f(x, torch.full((4,), t)), x, t)
        noise = torch.exp(0.5 * p["log_variance"]) * torch.randn(x.shape, generator=g, dtype=x.dtype) if t else 0
        x = p["mean"] + noise
    assert _rel(ours, x) < 1e-9


def test_sampler_options_table_lists_each_samplers_own_keywords():
    """SAMPLER_OPTIONS, by which sample() passes options, names exactly the keywords each sampler takes beyond
    the shared signature."""
    shared = {"model_fn", "x", "timesteps", "diffusion", "generator", "callback", "clip_x0", "edit_state"}
    for name, fn in SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert shared <= set(params), name
        assert set(SAMPLER_OPTIONS[name]) == set(params) - shared, name


def test_sampling_leaves_the_diffusion_unchanged():
    """The continuous ᾱ(t), σ(t), t(σ) are the diffusion's own: samplers store nothing on it."""
    d = _diffusion()
    before = dict(vars(d))
    for name in SAMPLERS:
        sample(gaussian_model_fn(d, M, S), torch.empty(1, 1, 2, 2), diffusion=d, sampler=name, steps=3, seed=0,
               karras=True,
               **({"corrector_steps": 1} if name == "langevin" else {}))
    assert vars(d).keys() == before.keys() and all(vars(d)[k] is v for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------
# The entry point: reproducibility per seed, callbacks, progress, errors.


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_image_in_any_batch(name):
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    kw = dict(diffusion=d, sampler=name, steps=8, **({"eta": 1.0} if name == "ddim" else {}))
    if name == "langevin":
        kw["corrector_steps"] = 1
    batch = sample(f, torch.empty(8, 1, 4, 4), seed=100, **kw)
    single = sample(f, torch.empty(1, 1, 4, 4), seed=103, **kw)
    listed = sample(f, torch.empty(2, 1, 4, 4), seed=[105, 103], **kw)
    torch.testing.assert_close(single[0], batch[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(listed[1], batch[3], rtol=1e-5, atol=1e-6)
    assert (batch[0] - batch[3]).abs().max() > 1e-3  # different seeds, different images


def test_callback_and_progress(capsys):
    d = _diffusion()
    seen = []
    sample(gaussian_model_fn(d, M, S), torch.randn(2, 1, 4, 4), diffusion=d, sampler="ddim", steps=7, progress=True,
           callback=lambda i, t, x, x0: seen.append((i, t, tuple(x.shape), tuple(x0.shape))))
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1] for s in seen] == make_timesteps(d, 7).tolist()
    assert all(s[2] == s[3] == (2, 1, 4, 4) for s in seen)
    assert "7/7" in capsys.readouterr().err


def test_conditioning_is_bound():
    d = _diffusion()
    base = gaussian_model_fn(d, M, S)
    got = {}

    def f(x, t, *, y, scale):
        got["y"], got["scale"] = y, scale
        return base(x, t)

    y = torch.arange(3)
    out = sample(f, torch.randn(3, 1, 2, 2), diffusion=d, sampler="plms", steps=3, y=y, scale=2.0)
    assert got["y"] is y and got["scale"] == 2.0 and out.shape == (3, 1, 2, 2)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"sampler": "dpm++"}, ValueError, "unknown sampler 'dpm\\+\\+'; expected one of .*ddim.*ddpm"),
        ({"steps": 0}, ValueError, "steps must lie in 1..1000"),
        ({"steps": 1001}, ValueError, "steps must lie in 1..1000"),
        ({"steps": 2.5}, TypeError, "steps must be an int"),
        ({"noise": [[0.0]]}, TypeError, "noise must be a torch.Tensor"),
        ({"noise": torch.full((2, 1, 4, 4), float("nan"))}, ValueError, "noise contains NaN"),
        ({"init_image": torch.zeros(2, 1, 4, 4), "strength": 0.0}, ValueError, "strength must lie in \\(0, 1\\]"),
        ({"init_image": torch.zeros(2, 1, 4, 4), "strength": 1.5}, ValueError, "strength must lie in \\(0, 1\\]"),
        ({"strength": 0.5}, ValueError, "needs init_image"),
        ({"init_image": torch.zeros(2, 1, 4, 5)}, ValueError, "init_image has shape \\(2, 1, 4, 5\\)"),
        ({"mask": torch.ones(2, 1, 3, 4), "known": torch.zeros(2, 1, 4, 4)}, ValueError,
         "mask has shape \\(2, 1, 3, 4\\)"),
        ({"mask": torch.ones(2, 1, 4, 4), "known": torch.zeros(3, 1, 4, 4)}, ValueError,
         "known has shape \\(3, 1, 4, 4\\)"),
        ({"mask": torch.ones(2, 1, 4, 4)}, ValueError, "both mask and known"),
        ({"mask": 2 * torch.ones(2, 1, 4, 4), "known": torch.zeros(2, 1, 4, 4)}, ValueError, "mask values"),
        ({"sampler": "plms", "eta": 0.5}, ValueError, "'plms' takes no eta"),
        ({"sampler": "plms", "resample_jumps": 2, "mask": torch.ones(2, 1, 4, 4), "known": torch.zeros(2, 1, 4, 4)},
         ValueError, "ddpm, ddim only"),
        ({"resample_jumps": 2}, ValueError, "only acts with inpainting"),
        ({"guidance_scale": 3.0}, ValueError, "needs uncond"),
        ({"seed": [1, 2, 3]}, ValueError, "3 seeds for a batch of 2"),
        ({"seed": "1"}, TypeError, "seed must be"),
        ({"sampler_options": {"order": 3}}, TypeError, "no option 'order'"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, err, match):
    d = _diffusion()
    args = {"noise": torch.randn(2, 1, 4, 4), "diffusion": d, "sampler": "ddim", "steps": 5, **kwargs}
    noise = args.pop("noise")
    with pytest.raises(err, match=match):
        sample(gaussian_model_fn(d, M, S), noise, **args)


def test_sampler_grid_errors():
    d = _diffusion()
    f = gaussian_model_fn(d, M, S)
    with pytest.raises(ValueError, match="strictly descending"):
        sample_ddim(f, torch.randn(2, 1), torch.tensor([10.0, 20.0]), diffusion=d)
    with pytest.raises(ValueError, match=r"lie in \[0, 999\]"):
        sample_ddpm(f, torch.randn(2, 1), torch.tensor([1000.0, 20.0]), diffusion=d)
    with pytest.raises(ValueError, match="doubled"):
        sample_ddpm(f, torch.randn(2, 1), torch.tensor([20.0, 10.0]), diffusion=d, variance="learned_range")
    assert math.isfinite(float(sample_plms(f, torch.randn(2, 1), torch.tensor([20.0]), diffusion=d).sum()))
