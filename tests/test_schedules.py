"""Schedules and timestep grids: closed forms, parity with diffusers, bad input."""

import math

import numpy as np
import pytest
import torch

from latentdiff.schedules import (
    alphas_cumprod,
    check_betas,
    karras_sigmas,
    make_betas,
    rescale_zero_terminal_snr,
    space_timesteps,
    timesteps,
)


def test_linear_is_the_seeds_range():
    b = make_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)


def test_linear_rescale_by_1000_over_T():
    b = make_betas("linear", 4000, rescale=True)
    assert b[0] == pytest.approx(1e-4 / 4) and b[-1] == pytest.approx(0.02 / 4)
    # Without rescaling the ends stay put whatever T is (diffusers' behaviour).
    assert make_betas("linear", 4000)[-1] == pytest.approx(0.02)


def test_scaled_linear_is_linear_in_sqrt_beta():
    b = make_betas("scaled_linear", 1000)
    s = np.sqrt(b)
    assert s[0] == pytest.approx(math.sqrt(0.00085)) and s[-1] == pytest.approx(math.sqrt(0.012))
    assert np.allclose(np.diff(s), np.diff(s)[0])


def test_cosine_alpha_bar_closed_form():
    T, s = 1000, 0.008
    ab = alphas_cumprod(make_betas("cosine", T))
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    # Identical until the β cap at 0.999 bites at the very end.
    assert np.allclose(ab[:-5], expected[:-5], rtol=1e-10)
    assert make_betas("cosine", T).max() <= 0.999


def test_alpha_bar_is_cumulative_product():
    b = make_betas("sigmoid", 50)
    ab = alphas_cumprod(b)
    prod = 1.0
    for i in range(50):
        prod *= 1 - b[i]
        assert ab[i] == pytest.approx(prod, rel=1e-12)


def test_zero_terminal_snr():
    b = rescale_zero_terminal_snr(make_betas("scaled_linear", 1000))
    ab = np.cumprod(1 - b)
    assert ab[-1] == pytest.approx(0.0, abs=1e-12)
    assert ab[0] == pytest.approx(alphas_cumprod(make_betas("scaled_linear", 1000))[0], rel=1e-10)
    assert b[-1] == pytest.approx(1.0)
    check_betas(b)  # a final β of 1 is allowed


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (("linear", {}), {"beta_schedule": "linear"}),
        (("scaled_linear", {}), {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        (("cosine", {}), {"beta_schedule": "squaredcos_cap_v2"}),
        (("sigmoid", {}), {"beta_schedule": "sigmoid"}),
    ],
)
def test_betas_match_diffusers(ours, theirs):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs).betas.double().numpy()
    name, opts = ours
    # diffusers builds its betas in float32 (torch.linspace / the cosine formula in float32): ~1e-6 relative.
    np.testing.assert_allclose(make_betas(name, 1000, **opts), ref, rtol=2e-6, atol=1e-9)


def test_timestep_grids():
    assert timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    g = timesteps(1000, 50, "leading", offset=1)
    assert g[0] == 981 and g[-1] == 1 and len(g) == 50  # CompVis' DDIM grid
    assert timesteps(1000, 10, "linspace").tolist()[0] == 999 and timesteps(1000, 10, "linspace").tolist()[-1] == 0
    assert all(np.all(np.diff(timesteps(1000, n, s)) < 0)
               for n in (1, 7, 1000) for s in ("leading", "trailing", "linspace"))


def test_timestep_grids_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)):
        sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
        sch.set_timesteps(25)
        assert timesteps(1000, 25, spacing, offset).tolist() == sch.timesteps.tolist(), spacing


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50").tolist() == list(range(0, 1000, 20))
    ts = space_timesteps(1000, [10])
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    assert len(space_timesteps(300, "10,15,20")) == 45


def test_karras_sigmas():
    s = karras_sigmas(0.03, 14.6, 10)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert np.all(np.diff(s) < 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_betas("quadratic"), "unknown schedule 'quadratic'"),
        (lambda: make_betas("linear", 0), "num_steps must be >= 1"),
        (lambda: make_betas("linear", 10, s=0.1), "unknown option"),
        (lambda: make_betas("linear", 10, beta_end=1.5), r"beta\[6\] = 1.00003"),
        (lambda: check_betas([0.1, 0.0, 0.2]), r"beta\[1\]"),
        (lambda: check_betas([0.1, float("nan")]), "NaN"),
        (lambda: check_betas([0.1, 1.0, 0.2]), r"beta\[1\]"),
        (lambda: timesteps(100, 101), "cannot exceed"),
        (lambda: timesteps(100, 10, "uneven"), "unknown spacing"),
        (lambda: timesteps(100, 10, "leading", offset=50), "outside"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_tables_are_float64():
    assert make_betas("cosine", 10).dtype == np.float64
    assert torch.as_tensor(make_betas("linear", 10)).dtype == torch.float64
