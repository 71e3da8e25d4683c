"""Parity with diffusers' DDPMScheduler (a test-only reference): add_noise and one reverse step."""

import pytest
import torch

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.schedules import make_betas

diffusers = pytest.importorskip("diffusers")

PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def test_q_sample_equals_add_noise():
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    d = GaussianDiffusion(make_betas("linear", 1000))
    x0, noise = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    t = torch.tensor([0, 1, 250, 600, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), sch.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_reverse_step_mean_and_variance(variance, prediction):
    sch = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type=variance,
        prediction_type=PRED[prediction], clip_sample=False,
    )
    # diffusers keeps its tables in float32; near ᾱ ≈ 0 (cosine, t → T) that costs ~1e-3. Rebuild them in
    # float64 from its own betas so the comparison checks the formulas, not the precision.
    sch.betas = sch.betas.double()
    sch.alphas = 1.0 - sch.betas
    sch.alphas_cumprod = torch.cumprod(sch.alphas, dim=0)
    sch.one = torch.tensor(1.0, dtype=torch.float64)
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction, variance=variance)
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = torch.randn(2, d.output_channels(3), 4, 4, dtype=torch.float64)
    if variance == "learned_range":
        out[:, 3:] = out[:, 3:].tanh()
    for t in (1, 37, 500, 998):
        noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        ref = sch.step(out, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        p = d.p_mean_variance(out, x_t, t)
        ours = p["mean"] + torch.exp(0.5 * p["log_variance"]) * noise
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # t = 0 (DDPM's step 1): the mean only, no noise, in both.
    ref0 = sch.step(out, 0, x_t).prev_sample
    torch.testing.assert_close(d.p_mean_variance(out, x_t, 0)["mean"], ref0, rtol=1e-5, atol=1e-5)
