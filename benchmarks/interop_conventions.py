"""How much each diffusers convention matters: the tiny SD1 pipeline (tests/helpers/tiny_sd.py) sampled by diffusers
and by latentdiff with the mapped options, and with one option back at latentdiff's default.

    python benchmarks/interop_conventions.py [--work /tmp/interop_conventions]

Prints the relative difference of the final latents, max|ours - diffusers| / max|diffusers|, 10 steps, guidance 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/interop_conventions")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import diffusers

    import latentdiff
    from latentdiff.interop.editing import generate
    from latentdiff.interop.schedulers import from_scheduler_config

    from helpers.tiny_sd import build

    torch.set_num_threads(1)
    folder = build(Path(args.work) / "sd1", "sd1")
    base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    pipe = latentdiff.load(folder)
    prompts = ["a red circle", "a square on"]
    base_config = dict(base.scheduler.config)  # the folder's (DDIM, leading, offset 1)
    cases = [
        ("Euler, Karras, trailing", "EulerDiscreteScheduler",
         {"timestep_spacing": "trailing", "use_karras_sigmas": True}, {"karras_range": "schedule"}),
        ("Euler, trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {"init_noise": "vp"}),
        ("DPM-Solver++ 2M, leading", "DPMSolverMultistepScheduler", {}, {"extra_point": False}),
        ("DPM-Solver++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True},
         {"round_model_t": False}),
    ]
    for name, cls, cfg, default in cases:
        base.scheduler = getattr(diffusers, cls).from_config({**base_config, **cfg})
        gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        ref = base(prompts, num_inference_steps=10, guidance_scale=3.0, generator=gens, output_type="latent").images
        _, sample, extra = from_scheduler_config(dict(base.scheduler.config))
        for label, change in (("mapped", {}), (f"with {default}", default)):
            got = generate(pipe, prompts, steps=10, guidance=3.0, seed=5, output="latent",
                           sampler_options=extra or None, **{**sample, **change})
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            print(f"{name:28s} {label:32s} relative difference {err:.2e}")


if __name__ == "__main__":
    main()
