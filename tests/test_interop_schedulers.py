"""diffusers scheduler configs mapped onto latentdiff's samplers (latentdiff.interop.schedulers): on a grid of
scheduler class x timestep spacing x steps_offset x Karras x prediction type, latentdiff's sampler with the mapped
options follows the scheduler's trajectory in a diffusers-style loop (x_T scaled by init_noise_sigma, the model fed
scale_model_input, the same generators), to 1e-4 relative."""

import inspect
import itertools

import pytest
import torch

from latentdiff.config import DiffusionSection, update
from latentdiff.diffusion import GaussianDiffusion
from latentdiff.errors import CheckpointError
from latentdiff.interop.schedulers import from_scheduler_config, to_scheduler_config
from latentdiff.pipeline import build_diffusion
from latentdiff.samplers import sample

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


class TinyNet(torch.nn.Module):
    """A fixed random conv net of (x, t): nonlinear in both, cheap, and fractional t changes its output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(8, 2, 3, 3, generator=g) * 0.3)
        self.w_t = torch.nn.Parameter(torch.randn(8, 2, generator=g))
        self.w_out = torch.nn.Parameter(torch.randn(2, 8, 3, 3, generator=g) * 0.2)

    def forward(self, x, t):
        t = torch.as_tensor(t).float().expand(x.shape[0]) / 1000
        emb = torch.stack([torch.sin(3 * t), torch.cos(3 * t)], 1) @ self.w_t.T  # (B, 8)
        h = torch.tanh(torch.nn.functional.conv2d(x, self.w_in, padding=1) + emb[:, :, None, None])
        return torch.nn.functional.conv2d(h, self.w_out, padding=1)


NET = TinyNet().eval()


def model_fn(x, t):
    with torch.no_grad():
        return NET(x, t)


def diffusers_run(cfg: dict, steps: int, seed: int = 3):
    """diffusers' pipeline loop for the scheduler ``cfg``: noise from each sample's generator times
    init_noise_sigma, scale_model_input, step with the same generators."""
    sched = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    x = torch.cat([torch.randn(1, 2, 6, 6, generator=g) for g in gens]) * sched.init_noise_sigma
    extra = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **extra).prev_sample
    return x


def ours_run(cfg: dict, steps: int, seed: int = 3, **override):
    diffusion, opts, extra = from_scheduler_config(cfg)
    proc = build_diffusion(update(DiffusionSection(), diffusion, where="test"))
    opts = {**opts, **override}
    name = opts.pop("sampler")
    return sample(model_fn, torch.empty(2, 2, 6, 6), diffusion=proc, sampler=name, steps=steps, seed=seed,
                  sampler_options=extra or None, **opts)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


SPACINGS = [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)]
PREDICTIONS = ["epsilon", "v_prediction"]
GRID = []
for cls, karras_options in [("EulerDiscreteScheduler", (False, True)), ("DPMSolverMultistepScheduler", (False, True)),
                            ("UniPCMultistepScheduler", (False, True)), ("EulerAncestralDiscreteScheduler", (False,)),
                            ("DDIMScheduler", (False,)), ("PNDMScheduler", (False,)), ("DDPMScheduler", (False,)),
                            ("HeunDiscreteScheduler", (False, True))]:
    for (spacing, offset), karras, pred in itertools.product(SPACINGS, karras_options, PREDICTIONS):
        if cls in ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler") and spacing == "linspace":
            continue  # diffusers steps these to t - T//N, off its own linspace grid (see docs/interop.md)
        if cls.startswith(("Euler", "Heun")) and spacing == "linspace" and not karras:
            continue  # diffusers' Euler linspace grid is fractional with σ interpolated linearly (docs/interop.md)
        GRID.append((cls, spacing, offset, karras, pred))


@pytest.mark.parametrize("cls,spacing,offset,karras,pred", GRID)
def test_mapped_sampler_follows_the_scheduler(cls, spacing, offset, karras, pred):
    cfg = {**SD, "_class_name": cls, "timestep_spacing": spacing, "steps_offset": offset, "prediction_type": pred}
    if karras:
        cfg["use_karras_sigmas"] = True
    if cls in ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler"):
        cfg.update(set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
    multistep = cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    for steps in (8, 20) if multistep else (8,):  # below and above diffusers' lower_order_final threshold (15)
        assert rel(ours_run(cfg, steps), diffusers_run(cfg, steps)) < 1e-4, steps


def test_the_new_options_are_what_makes_them_match():
    """Without the diffusers conventions (latentdiff's defaults) the trajectories differ visibly."""
    euler_karras = {**SD, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                    "use_karras_sigmas": True}
    ref = diffusers_run(euler_karras, 10)
    assert rel(ours_run(euler_karras, 10), ref) < 1e-4
    assert rel(ours_run(euler_karras, 10, karras_range="schedule"), ref) > 1e-3  # the Karras-range gap
    euler = {**SD, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    assert rel(ours_run(euler, 10, init_noise="vp"), diffusers_run(euler, 10)) > 1e-3  # x_T = σ_max ε
    dpm = {**SD, "_class_name": "DPMSolverMultistepScheduler"}
    assert rel(ours_run(dpm, 10, extra_point=False), diffusers_run(dpm, 10)) > 1e-3  # N + 1 point grid
    dpm_k = {**dpm, "use_karras_sigmas": True}
    assert rel(ours_run(dpm_k, 10, round_model_t=False), diffusers_run(dpm_k, 10)) > 1e-5  # integer model t


def test_zero_terminal_snr_and_x0_prediction_map():
    cfg = {**SD, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
           "prediction_type": "v_prediction", "set_alpha_to_one": True, "clip_sample": False}
    diffusion, opts, _ = from_scheduler_config(cfg)
    assert diffusion["zero_terminal_snr"] and diffusion["prediction"] == "v" and opts["sampler"] == "ddim"
    assert rel(ours_run(cfg, 10), diffusers_run(cfg, 10)) < 1e-4
    assert from_scheduler_config({**SD, "prediction_type": "sample", "clip_sample": False})[0]["prediction"] == "x0"
    with pytest.raises(CheckpointError, match="clip_sample=true"):  # DDIM's default, not Stable Diffusion's
        from_scheduler_config({**SD, "_class_name": "DDIMScheduler"})


@pytest.mark.parametrize("change,message", [
    ({"_class_name": "LMSDiscreteScheduler"}, "LMSDiscreteScheduler is not supported"),
    ({"thresholding": True}, "thresholding=True is not supported"),
    ({"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "skip_prk_steps=false"),
    ({"beta_schedule": "squaredcos"}, "beta_schedule 'squaredcos'"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "algorithm_type 'dpmsolver'"),
])  # fmt: skip
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(CheckpointError, match=message):
        from_scheduler_config({**SD, "_class_name": "DDIMScheduler", "clip_sample": False, **change}, "sched.json")


def test_round_trip_of_the_mapping():
    for cls in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler"):
        cfg = {**SD, "_class_name": cls, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
               "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}
        diffusion, opts, _ = from_scheduler_config(cfg)
        back = to_scheduler_config({**diffusion}, opts)
        assert back["_class_name"] == cls
        assert from_scheduler_config(back)[:2] == (diffusion, opts)


def test_latentdiff_defaults_are_unchanged():
    d = GaussianDiffusion(torch.linspace(1e-4, 0.02, 1000).double().numpy())
    a = sample(model_fn, torch.empty(2, 2, 6, 6), diffusion=d, sampler="euler", steps=6, seed=0, karras=True,
               spacing="trailing")
    b = sample(model_fn, torch.empty(2, 2, 6, 6), diffusion=d, sampler="euler", steps=6, seed=0, karras=True,
               spacing="trailing", karras_range="schedule", init_noise="vp", extra_point=False, round_model_t=False)
    assert torch.equal(a, b)
