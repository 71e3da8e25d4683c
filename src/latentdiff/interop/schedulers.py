"""diffusers scheduler configs (``scheduler/scheduler_config.json``) as latentdiff's diffusion and sampler options.

A diffusers scheduler is a class plus a config; latentdiff has one diffusion process (the β table, the prediction
type) and stateless samplers with options. :func:`from_scheduler_config` splits a config into the two, so that
latentdiff reproduces the scheduler's trajectory (tests/test_interop_schedulers.py checks each on a grid):

| diffusers                               | latentdiff                                                         |
| --------------------------------------- | ------------------------------------------------------------------ |
| beta_schedule, beta_start, beta_end     | diffusion.schedule (scaled_linear, linear, cosine), schedule_options |
| num_train_timesteps                     | diffusion.num_steps                                                |
| prediction_type epsilon / v_prediction / sample | diffusion.prediction eps / v / x0                          |
| rescale_betas_zero_snr                  | diffusion.zero_terminal_snr                                        |
| DDIMScheduler / PNDMScheduler (skip_prk_steps) / DDPMScheduler | sampler ddim / plms / ddpm                  |
| EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete | sampler euler / euler_ancestral / heun               |
| DPMSolverMultistep (algorithm_type, solver_order) | dpmpp_2m, dpmpp_3m (dpmsolver++), dpmpp_2m_sde (sde-dpmsolver++) |
| UniPCMultistep (solver_order, disable_corrector) | unipc (order, disable_corrector)                           |
| timestep_spacing, steps_offset          | sample.spacing, sample.offset                                      |
| set_alpha_to_one                        | sample.set_alpha_to_one (ddim, plms)                               |
| use_karras_sigmas                       | sample.karras; Euler family: karras_range "grid"; DPM/UniPC: round_model_t |
| DPM-Solver / UniPC leading, linspace grid of N + 1 points | sample.extra_point                               |
| Euler family on linspace / trailing: x_T = σ_max·ε | sample.init_noise "sigma"                               |
| final_sigmas_type zero                  | (latentdiff's σ-space and DPM samplers end at σ = 0)               |

What latentdiff does not implement raises a CheckpointError naming the setting: thresholding, final_sigmas_type
sigma_min, PNDM's Runge-Kutta warm-up, trained_betas, exponential / beta / Lu-lambda grids, and others.
"""

from __future__ import annotations

import math

from ..errors import CheckpointError

SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SIGMA_SPACE = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
               "HeunDiscreteScheduler": "heun"}
# Settings that must keep one of these values (diffusers' defaults); anything else is unsupported.
_REQUIRED = {"thresholding": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
             "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "final_sigmas_type": ("zero",),
             "euler_at_final": (False,), "timestep_type": ("discrete",), "interpolation_type": ("linear",),
             "variance_type": (None, "fixed_small"), "predict_x0": (True,), "sigma_min": (None,),
             "sigma_max": (None,), "shift_terminal": (None,), "use_dynamic_shifting": (False,),
             "lambda_min_clipped": (-math.inf, None)}
_SOLVER_TYPES = {"DPMSolverMultistepScheduler": "midpoint", "UniPCMultistepScheduler": "bh2"}


def _check_required(cfg: dict, cls: str, where: str) -> None:
    for key, allowed in _REQUIRED.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"{where}: {cls} with {key}={cfg[key]!r} is not supported by latentdiff's samplers")
    if cls in _SOLVER_TYPES and cfg.get("solver_type", _SOLVER_TYPES[cls]) != _SOLVER_TYPES[cls]:
        raise CheckpointError(f"{where}: {cls} with solver_type={cfg['solver_type']!r} is not supported "
                              f"({_SOLVER_TYPES[cls]} only)")


def diffusion_options(cfg: dict, where: str) -> dict:
    """The ``diffusion`` config section (DiffusionSection fields) of a scheduler config."""
    schedule = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{where}: trained_betas (a β table in the config) is not supported; use a named "
                              "beta_schedule")
    if schedule not in SCHEDULES:
        raise CheckpointError(f"{where}: beta_schedule {schedule!r} is not supported (latentdiff maps "
                              f"{', '.join(SCHEDULES)})")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"{where}: prediction_type {prediction!r} is not supported ({', '.join(PREDICTIONS)})")
    options = {}
    if schedule != "squaredcos_cap_v2":
        options = {"beta_start": float(cfg.get("beta_start", 0.0001)), "beta_end": float(cfg.get("beta_end", 0.02))}
    return {"schedule": SCHEDULES[schedule], "num_steps": int(cfg.get("num_train_timesteps", 1000)),
            "schedule_options": options, "prediction": PREDICTIONS[prediction],
            "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False))}


# diffusers' defaults for the settings that a config file may leave out (they differ by class).
CLASS_DEFAULTS = {
    "DDIMScheduler": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "PNDMScheduler": {"timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False},
    "DDPMScheduler": {"timestep_spacing": "leading", "clip_sample": True},
}
LINSPACE_DEFAULT = {"timestep_spacing": "linspace"}  # Euler, Euler ancestral, Heun, DPM-Solver, UniPC


def with_defaults(cfg: dict) -> dict:
    """``cfg`` with diffusers' class defaults for the keys it leaves out."""
    cls = cfg.get("_class_name", "DDIMScheduler")
    return {**CLASS_DEFAULTS.get(cls, LINSPACE_DEFAULT), **cfg}


def sampler_options(cfg: dict, where: str) -> dict:
    """The ``sample`` config section fields (SampleSection) that reproduce the scheduler of ``cfg``."""
    cfg = with_defaults(cfg)
    cls = cfg.get("_class_name", "DDIMScheduler")
    _check_required(cfg, cls, where)
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise CheckpointError(f"{where}: timestep_spacing {spacing!r} is not supported (leading, trailing, linspace)")
    opts = {"spacing": spacing, "offset": int(cfg.get("steps_offset", 0)) if spacing == "leading" else 0,
            "karras": bool(cfg.get("use_karras_sigmas", False))}
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        if cls == "PNDMScheduler" and not cfg.get("skip_prk_steps", False):
            raise CheckpointError(f"{where}: PNDMScheduler with skip_prk_steps=false (Runge-Kutta warm-up) is not "
                                  "implemented; latentdiff's plms sampler is PNDM with skip_prk_steps=true")
        if cls == "DDIMScheduler" and cfg.get("clip_sample"):
            raise CheckpointError(f"{where}: DDIMScheduler with clip_sample=true (its default) clips x̂_0 but keeps "
                                  "the unclipped ε̂, which latentdiff does not implement; Stable Diffusion configs "
                                  "set clip_sample false")
        opts.update(sampler="ddim" if cls == "DDIMScheduler" else "plms",
                    set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)))
    elif cls == "DDPMScheduler":
        if cfg.get("clip_sample", True):
            raise CheckpointError(f"{where}: DDPMScheduler with clip_sample=true clips x̂_0 in latent space; latentdiff "
                                  "does that for pixel models only (set clip_sample false)")
        opts["sampler"] = "ddpm"
    elif cls in SIGMA_SPACE:
        opts.update(sampler=SIGMA_SPACE[cls], karras_range="grid",
                    init_noise="sigma" if spacing in ("linspace", "trailing") else "vp")
    elif cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        order = int(cfg.get("solver_order", 2))
        if cls == "DPMSolverMultistepScheduler":
            algorithm = cfg.get("algorithm_type", "dpmsolver++")
            names = {("dpmsolver++", 2): "dpmpp_2m", ("dpmsolver++", 3): "dpmpp_3m",
                     ("sde-dpmsolver++", 2): "dpmpp_2m_sde"}
            if (algorithm, order) not in names:
                raise CheckpointError(f"{where}: DPMSolverMultistepScheduler with algorithm_type {algorithm!r} and "
                                      f"solver_order {order} is not supported ({', '.join(map(str, names))})")
            opts["sampler"] = names[(algorithm, order)]
        else:
            opts["sampler"] = "unipc"
        opts.update(extra_point=True, round_model_t=opts["karras"])
    else:
        raise CheckpointError(f"{where}: scheduler {cls} is not supported by latentdiff (DDIM, PNDM, DDPM, Euler, "
                              "Euler ancestral, Heun, DPM-Solver++, UniPC are)")
    return opts


def solver_extras(cfg: dict) -> dict:
    """Options of the chosen sampler itself (``sampler_options=`` of samplers.sample) that the config sets."""
    cls = cfg.get("_class_name")
    if cls == "UniPCMultistepScheduler":
        return {"order": int(cfg.get("solver_order", 2)), "lower_order_final": bool(cfg.get("lower_order_final", True)),
                "disable_corrector": tuple(cfg.get("disable_corrector", ()) or ())}
    if cls == "PNDMScheduler":
        return {"combine": "output"}  # the multistep runs on raw outputs (matters for v-prediction)
    if cls == "DPMSolverMultistepScheduler" and int(cfg.get("solver_order", 2)) == 3:
        return {"lower_order_final": bool(cfg.get("lower_order_final", True))}
    return {}


def from_scheduler_config(cfg: dict, where: str = "scheduler_config.json") -> tuple[dict, dict, dict]:
    """(diffusion section, sample section fields, sampler_options) of a diffusers scheduler config."""
    return diffusion_options(cfg, where), sampler_options(cfg, where), solver_extras(cfg)


def to_scheduler_config(diffusion: dict, sample: dict) -> dict:
    """A diffusers scheduler config for a latentdiff diffusion section and sample section (as dicts); the sampler
    picks the class. Options diffusers cannot express (karras_range schedule on the Euler family) are dropped."""
    schedule = {v: k for k, v in SCHEDULES.items()}.get(diffusion["schedule"])
    if schedule is None:
        raise CheckpointError(f"schedule {diffusion['schedule']!r} has no diffusers beta_schedule")
    sampler = sample.get("sampler", "ddim")
    classes = {"ddim": "DDIMScheduler", "plms": "PNDMScheduler", "ddpm": "DDPMScheduler",
               "euler": "EulerDiscreteScheduler",
               "euler_ancestral": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
               "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_3m": "DPMSolverMultistepScheduler",
               "dpmpp_2m_sde": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    cls = classes.get(sampler, "DDIMScheduler")
    opts = diffusion.get("schedule_options", {})
    cfg = {"_class_name": cls, "num_train_timesteps": diffusion["num_steps"], "beta_schedule": schedule,
           "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion["prediction"]],
           "rescale_betas_zero_snr": bool(diffusion.get("zero_terminal_snr", False)),
           "timestep_spacing": sample.get("spacing", "leading"), "steps_offset": int(sample.get("offset", 0))}
    if schedule != "squaredcos_cap_v2":
        cfg.update(beta_start=opts.get("beta_start", 0.00085 if schedule == "scaled_linear" else 1e-4),
                   beta_end=opts.get("beta_end", 0.012 if schedule == "scaled_linear" else 0.02))
    if cls in ("DDIMScheduler", "PNDMScheduler"):
        one = sample.get("set_alpha_to_one")
        cfg.update(set_alpha_to_one=True if one is None else bool(one), clip_sample=False)
        if cls == "PNDMScheduler":
            cfg["skip_prk_steps"] = True
    elif cls == "DDPMScheduler":
        cfg["clip_sample"] = False
    else:
        cfg["use_karras_sigmas"] = bool(sample.get("karras", False))
    if sampler == "dpmpp_3m":
        cfg["solver_order"] = 3
    if sampler == "dpmpp_2m_sde":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    return cfg
