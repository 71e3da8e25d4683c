"""DPM-Solver++ (2M, 3M, 2M SDE), UniPC and the Euler family (Euler, Euler ancestral, Heun).

Exact answers on Gaussian data N(M, S²) (tests/helpers/analytic.py): the data's mean and variance, the end point of
the probability-flow ODE, and the order of convergence as a log-log slope. Parity with diffusers, step by
step on the same model function and the same x_T (and the same noise draws for the stochastic samplers).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.samplers.common import alpha_bar, make_timesteps
from latentdiff.samplers.dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from latentdiff.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from latentdiff.samplers.unipc import sample_unipc
from latentdiff.schedules import make_betas

from helpers.analytic import gaussian_model_fn, ode_endpoint, optimal_x0

M, S = 0.5, 0.3
BETAS = make_betas("linear", 1000)

ALL = {
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
}


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(BETAS)


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread only adds synchronisation (10x slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Exact answers on Gaussian data


def ode_then_denoise(x, ts, diffusion):
    """Exact ODE from ts[0] to the last grid point ts[-1], then the exact x̂_0 there.

    Every sampler here ends with a first-order step from the last grid point to σ = 0, which lands on x̂_0;
    that step's error (≈ σ_min²/(2S) for this data) does not shrink with the number of steps, so the order of
    the solver is measured against this reference. ode_endpoint (σ = 0) is checked separately.
    """
    ab0, ab1 = alpha_bar(diffusion, ts[0]), alpha_bar(diffusion, ts[-1])
    var0, var1 = (1 - ab0) / ab0, (1 - ab1) / ab1  # σ² in σ-space
    # (x_σ − M)/√(S² + σ²) is constant
    x_sigma = M + (S**2 + var1).sqrt() * (x.double() / ab0.sqrt() - M) / (S**2 + var0).sqrt()
    return optimal_x0(x_sigma * ab1.sqrt(), ab1, M, S)


# name, sampler, steps, expected log-log slope range, tolerance against the ODE end point at the most steps
ORDER_CASES = [
    ("euler", sample_euler, (40, 80, 160), (0.85, 1.2), 3e-2),
    ("heun", sample_heun, (40, 80, 160), (1.8, 2.4), 2e-3),
    ("dpmpp_2m", sample_dpmpp_2m, (40, 80, 160), (1.8, 2.4), 2e-3),
    # The reference 3M formula is second order asymptotically (see sample_dpmpp_3m); it still beats 2M.
    ("dpmpp_3m", sample_dpmpp_3m, (80, 160, 320), (1.6, 2.4), 1e-3),
    ("dpmpp_3m_exact", partial(sample_dpmpp_3m, exact_third_order=True), (40, 80, 160), (2.7, 3.6), 1e-3),
    ("unipc", sample_unipc, (40, 80, 160), (2.7, 3.6), 1e-3),  # UniPC-2: the corrector adds one order
    ("unipc_order1", partial(sample_unipc, order=1), (40, 80, 160), (1.8, 2.4), 5e-3),
    ("unipc_order3", partial(sample_unipc, order=3), (40, 80, 160), (3.6, 4.8), 1e-3),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,sampler,steps,slope_range,end_tol", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_ode_convergence_order(diffusion, name, sampler, steps, slope_range, end_tol):
    # Karras grids are smooth in σ, so the asymptotic regime shows at these step counts (integer grids of the
    # linear schedule take a large λ step at the low-noise end and stay pre-asymptotic well past 100 steps).
    x = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=seeded(1))  # float64: errors reach 1e-6
    model_fn = gaussian_model_fn(diffusion, M, S)
    errors = []
    for n in steps:
        ts = make_timesteps(diffusion, n, karras=True)
        out = sampler(model_fn, x, ts, diffusion=diffusion)
        errors.append((out - ode_then_denoise(x, ts, diffusion)).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope_range[0] < slope < slope_range[1], f"{name}: errors {errors}, slope {slope:.2f}"
    # And it converges to the exact end point of the ODE at σ = 0.
    end = ode_endpoint(x, alpha_bar(diffusion, ts[0]), M, S)
    assert (out - end).abs().max().item() < end_tol


def test_dpmpp_3m_beats_2m(diffusion):
    x = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=seeded(1))
    model_fn = gaussian_model_fn(diffusion, M, S)
    ts = make_timesteps(diffusion, 40, karras=True)
    ref = ode_then_denoise(x, ts, diffusion)
    err = {f.__name__: (f(model_fn, x, ts, diffusion=diffusion) - ref).abs().max().item()
           for f in (sample_dpmpp_2m, sample_dpmpp_3m)}
    assert err["sample_dpmpp_3m"] < 0.5 * err["sample_dpmpp_2m"], err


# name, steps: first-order samplers need more steps for the same accuracy
STAT_CASES = [
    ("dpmpp_2m", sample_dpmpp_2m, 60),
    ("dpmpp_3m", sample_dpmpp_3m, 60),
    ("dpmpp_2m_sde", sample_dpmpp_2m_sde, 100),
    ("unipc", sample_unipc, 60),
    ("heun", sample_heun, 60),
    ("heun_churn", partial(sample_heun, s_churn=20.0), 100),
    ("euler", sample_euler, 300),
    ("euler_ancestral", sample_euler_ancestral, 400),
]


@pytest.mark.parametrize("name,sampler,steps", STAT_CASES, ids=[c[0] for c in STAT_CASES])
def test_samples_have_the_data_mean_and_std(diffusion, name, sampler, steps):
    x = torch.randn(256, 1, 8, 8, generator=seeded(1))  # 16384 values: standard errors ≈ 0.002
    ts = make_timesteps(diffusion, steps, karras=True)
    out = sampler(gaussian_model_fn(diffusion, M, S), x, ts, diffusion=diffusion, generator=seeded(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert abs(out.mean().item() - M) < 0.01, out.mean().item()
    assert abs(out.std().item() - S) < 0.01, out.std().item()


# ---------------------------------------------------------------------------------------------------------
# The shared contract: callback, edit_state, generators, errors


@pytest.mark.parametrize("name", list(ALL))
def test_callback_and_edit_state_see_each_step_in_vp_scale(diffusion, name):
    ts = make_timesteps(diffusion, 6, spacing="trailing")
    seen, levels = [], []

    def callback(i, t, x, x0):
        seen.append((i, t, x.clone(), x0.shape))

    def edit_state(x, ab_next):
        levels.append(ab_next)
        return x

    x = torch.randn(2, 1, 4, 4, generator=seeded(0))
    out = ALL[name](gaussian_model_fn(diffusion, M, S), x, ts, diffusion=diffusion, generator=seeded(1),
                    callback=callback, edit_state=edit_state)
    assert [s[0] for s in seen] == list(range(6)) and [s[1] for s in seen] == ts.tolist()
    assert all(s[3] == x.shape for s in seen)
    assert torch.equal(seen[-1][2], out)  # the last state is the result, at ᾱ = 1
    expected = alpha_bar(diffusion, ts[1:]).tolist() + [1.0]
    assert levels == pytest.approx(expected, rel=1e-12)
    # A state reported mid-way is in VP scale: its spread is about 1, not √(1 + σ²).
    assert 0.3 < seen[1][2].std().item() < 2.0


@pytest.mark.parametrize("name", list(ALL))
def test_edit_state_result_is_the_state(diffusion, name):
    ts = make_timesteps(diffusion, 5, spacing="trailing")
    x = torch.randn(2, 1, 4, 4, generator=seeded(0))
    model_fn = gaussian_model_fn(diffusion, M, S)
    # Clamp the left half to the known data value M at every noise level (q_sample's mean, no noise).
    edit_state = lambda x, ab: torch.cat([torch.full_like(x[..., :2], ab**0.5 * M), x[..., 2:]], dim=-1)  # noqa: E731
    out = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(1), edit_state=edit_state)
    assert torch.allclose(out[..., :2], torch.full_like(out[..., :2], M))
    # A change made on the way (x̂_0 moved by +1 at the last grid level) carries on to the result.
    ab_last = float(alpha_bar(diffusion, ts[-1]))
    shift = lambda x, ab: x + ab**0.5 if abs(ab - ab_last) < 1e-12 else x  # noqa: E731
    plain = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(1))
    shifted = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(1), edit_state=shift)
    assert (shifted - plain).mean().item() > 0.05


@pytest.mark.parametrize("name", list(ALL))
def test_clip_x0_bounds_the_result(diffusion, name):
    ts = make_timesteps(diffusion, 6, spacing="trailing")
    model_fn = gaussian_model_fn(diffusion, 0.8, 0.5)  # data often above 1
    x = torch.randn(4, 1, 4, 4, generator=seeded(0))
    free = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(1))
    clipped = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(1), clip_x0=True)
    assert free.max() > 1.1 and clipped.abs().max() <= 1 + 1e-5


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "euler_ancestral"])
def test_noise_comes_from_each_samples_generator(diffusion, name):
    ts = make_timesteps(diffusion, 8, spacing="trailing")
    model_fn = gaussian_model_fn(diffusion, M, S)
    x = torch.randn(2, 1, 4, 4, generator=seeded(0))
    pair = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=[seeded(10), seeded(11)])
    alone = ALL[name](model_fn, x[1:], ts, diffusion=diffusion, generator=[seeded(11)])
    assert torch.allclose(pair[1:], alone, atol=1e-6)
    again = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(3))
    other = ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(4))
    assert torch.equal(again, ALL[name](model_fn, x, ts, diffusion=diffusion, generator=seeded(3)))
    assert not torch.allclose(again, other)


def test_bad_input_is_rejected(diffusion):
    model_fn = gaussian_model_fn(diffusion, M, S)
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="descending"):
        sample_dpmpp_2m(model_fn, x, torch.tensor([10.0, 20.0]), diffusion=diffusion)
    with pytest.raises(ValueError, match="order"):
        sample_unipc(model_fn, x, make_timesteps(diffusion, 4), diffusion=diffusion, order=4)
    with pytest.raises(TypeError):
        sample_euler(model_fn, x, make_timesteps(diffusion, 4), diffusion=diffusion, eta=1.0)


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers

diffusers = pytest.importorskip("diffusers")


class TinyNet(torch.nn.Module):
    """A fixed random conv net with a timestep input: a nonlinear model function for parity tests."""

    def __init__(self, channels: int = 2, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.time = torch.nn.Linear(2, width)
        self.conv_out = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        t = t.float() / 1000
        emb = torch.stack([torch.sin(3 * t), torch.cos(3 * t)], dim=1)  # (B, 2)
        h = torch.tanh(self.conv_in(x) + self.time(emb)[:, :, None, None])
        return 0.5 * self.conv_out(h)


def model_and_process(kind: str):
    """(diffusion, model_fn, diffusers prediction_type) for the analytic ε model or the random v-predicting net."""
    if kind == "analytic":
        diff = GaussianDiffusion(BETAS)
        return diff, gaussian_model_fn(diff, M, S), "epsilon"
    diff = GaussianDiffusion(BETAS, prediction="v")
    net = TinyNet().eval()
    return diff, (lambda x, t: net(x, t)), "v_prediction"


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def use_grid(sched, ts):
    """Put our descending integer grid into a diffusers multistep scheduler (after set_timesteps)."""
    ac = sched.alphas_cumprod.double().numpy()
    sigmas = np.interp(ts.numpy(), np.arange(ac.size), np.sqrt((1 - ac) / ac))
    sched.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    sched.timesteps = torch.from_numpy(ts.numpy().astype(np.int64))
    sched.num_inference_steps = len(ts)


def run_diffusers_multistep(sched, ts, model_fn, x, seed=None):
    """The diffusers pipeline loop for DPM-Solver / UniPC (x in VP scale throughout)."""
    sched.set_timesteps(len(ts))
    use_grid(sched, ts)
    extra = {"generator": seeded(seed)} if seed is not None else {}
    for t in sched.timesteps:
        out = model_fn(x, t.expand(x.shape[0]))
        x = sched.step(out, t, x, **extra).prev_sample
    return x


def run_diffusers_sigma_space(sched, model_fn, x_vp, seed=None):
    """The diffusers pipeline loop for the Euler family: x in σ-space, the model fed x/√(σ² + 1).

    It starts from our x_T converted, x_T·√(σ_max² + 1), instead of init_noise_sigma·noise: our samplers take
    x_T in VP scale whatever the spacing, diffusers scales its noise by σ_max for linspace/trailing grids.
    """
    x = x_vp * (1 + sched.sigmas[0].double() ** 2).sqrt().float()
    extra = {"generator": seeded(seed)} if seed is not None else {}
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(out, t, x, **extra).prev_sample
    return x


GRIDS = [("leading", 1, 8), ("leading", 1, 20), ("trailing", 0, 8), ("trailing", 0, 20)]  # < 15 and >= 15 steps


@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("spacing,offset,steps", GRIDS)
def test_dpm_solver_and_unipc_match_diffusers(kind, spacing, offset, steps):
    diff, model_fn, prediction_type = model_and_process(kind)
    ts = make_timesteps(diff, steps, spacing=spacing, offset=offset)
    x = torch.randn(2, 2, 4, 4, generator=seeded(1))
    common = dict(trained_betas=BETAS, prediction_type=prediction_type)
    cases = [
        (sample_dpmpp_2m, {}, diffusers.DPMSolverMultistepScheduler(**common, solver_order=2), None),
        (sample_dpmpp_3m, {}, diffusers.DPMSolverMultistepScheduler(**common, solver_order=3), None),
        (sample_dpmpp_2m_sde, {}, diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="sde-dpmsolver++"), 7),
        (sample_unipc, {}, diffusers.UniPCMultistepScheduler(**common), None),
        (sample_unipc, {"order": 3}, diffusers.UniPCMultistepScheduler(**common, solver_order=3), None),
        (sample_unipc, {"disable_corrector": (0,)}, diffusers.UniPCMultistepScheduler(**common, disable_corrector=[0]),
         None),
    ]
    for sampler, options, sched, seed in cases:
        gen = seeded(seed) if seed is not None else None
        ours = sampler(model_fn, x, ts, diffusion=diff, generator=gen, **options)
        theirs = run_diffusers_multistep(sched, ts, model_fn, x, seed)
        assert rel_err(ours, theirs) < 1e-4, (sampler.__name__, options, rel_err(ours, theirs))


def test_3m_lower_order_final_matters_below_15_steps():
    diff, model_fn, _ = model_and_process("analytic")
    ts = make_timesteps(diff, 8, spacing="trailing")
    x = torch.randn(2, 2, 4, 4, generator=seeded(1))
    low = sample_dpmpp_3m(model_fn, x, ts, diffusion=diff)
    full = sample_dpmpp_3m(model_fn, x, ts, diffusion=diff, lower_order_final=False)
    sched = diffusers.DPMSolverMultistepScheduler(trained_betas=BETAS, solver_order=3, lower_order_final=False)
    assert rel_err(full, run_diffusers_multistep(sched, ts, model_fn, x)) < 1e-4
    assert rel_err(low, full) > 1e-3


@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [8, 20])
def test_euler_and_heun_match_diffusers(kind, karras, steps):
    diff, model_fn, prediction_type = model_and_process(kind)
    # diffusers builds Karras grids from its linspace grid, whose ends are our σ_min and σ_max.
    spacing = "linspace" if karras else "trailing"
    ts = make_timesteps(diff, steps, spacing=spacing, karras=karras)
    x = torch.randn(2, 2, 4, 4, generator=seeded(1))
    for sampler, cls in [(sample_euler, diffusers.EulerDiscreteScheduler),
                         (sample_heun, diffusers.HeunDiscreteScheduler)]:
        sched = cls(trained_betas=BETAS, prediction_type=prediction_type, use_karras_sigmas=karras,
                    timestep_spacing=spacing)
        sched.set_timesteps(steps)
        # Same grid: diffusers' Heun repeats each inner timestep for its second evaluation.
        every = 1 if sampler is sample_euler else 2
        assert np.allclose(sched.timesteps.numpy()[::every], ts.numpy(), atol=1e-2)  # float32 tables
        ours = sampler(model_fn, x, ts, diffusion=diff)
        theirs = run_diffusers_sigma_space(sched, model_fn, x)
        assert rel_err(ours, theirs) < 1e-4, (sampler.__name__, rel_err(ours, theirs))


@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
def test_euler_ancestral_matches_diffusers_with_the_same_noise(kind, spacing, offset):
    diff, model_fn, prediction_type = model_and_process(kind)
    ts = make_timesteps(diff, 12, spacing=spacing, offset=offset)
    x = torch.randn(2, 2, 4, 4, generator=seeded(1))
    sched = diffusers.EulerAncestralDiscreteScheduler(
        trained_betas=BETAS, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset
    )
    sched.set_timesteps(12)
    assert np.array_equal(sched.timesteps.numpy(), ts.numpy())
    # Both draw one torch.randn(x.shape) per step from the generator (diffusers also on the last step, after ours end).
    ours = sample_euler_ancestral(model_fn, x, ts, diffusion=diff, generator=seeded(5))
    theirs = run_diffusers_sigma_space(sched, model_fn, x, seed=5)
    assert rel_err(ours, theirs) < 1e-4
    sched.set_timesteps(12)
    assert rel_err(ours, run_diffusers_sigma_space(sched, model_fn, x, seed=6)) > 1e-2  # the noise matters


def test_heun_first_step_from_a_huge_sigma_stays_euler():
    """Regression: the cosine schedule's trailing grid starts at σ ≈ 2·10⁴ and jumps to σ ≈ 6; Heun's
    trapezoidal correction over that step amplified the slope difference by σ_0 (error ~3 against the exact
    ODE end point, chance accuracy on the digits demo model). The step now stays Euler."""
    cos = GaussianDiffusion(make_betas("cosine", 1000))
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=seeded(0))
    model_fn = gaussian_model_fn(cos, M, S)
    ts = make_timesteps(cos, 10, spacing="trailing")
    end = ode_endpoint(x, alpha_bar(cos, ts[0]), M, S)
    err = {name: (f(model_fn, x, ts, diffusion=cos) - end).abs().max().item()
           for name, f in (("euler", sample_euler), ("heun", sample_heun),
                           ("heun_always", partial(sample_heun, max_step_ratio=math.inf)))}
    assert err["heun_always"] > 1.0, err  # the failure this guards against is real
    assert err["heun"] < 0.6 * err["euler"] and err["heun_always"] > 20 * err["heun"], err
    calls = []
    sample_heun(lambda x, t, **c: calls.append(1) or model_fn(x, t), x, ts, diffusion=cos)
    assert len(calls) == 2 * 10 - 2  # no correction on the first and on the last step
