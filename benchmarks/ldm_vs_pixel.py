"""Does latent diffusion help with limited compute? The text recipes in latents (f = 4) and in pixels (f = 1), trained
for the same wall time.

    .venv/bin/python benchmarks/ldm_vs_pixel.py [--minutes M] [--first-stage AE_DIR] [--per-tag N] [--out DIR]
                                                 [--threads T]

The LDM paper's claim (Rombach et al. 2022, section 4.1): diffusion in the latents of a perceptually equivalent
first stage reaches better samples for the same training compute than diffusion in pixels, because every U-Net
step works on 16x fewer positions. Trained one after the other, each for ``train.max_minutes = M`` of training
loop (setup, such as building the latent cache, is timed apart):

- ``latent_cache``: recipe shapes_ldm_txt2img (KL-f4 latents 3x8x8) with ``latent.cache=true``: the frozen first
  stage encodes a pool of images once, and training reads the stored latents;
- ``latent_nocache``: the same with ``latent.cache=false``: every step renders its images and runs the encoder;
- ``pixel``: recipe shapes_pixel_txt2img, its pixel twin (3x32x32; the same conditioning, data, diffusion and
  training sections, a U-Net with the latent one's levels plus two at 32x32 and 16x16).

Each arm's ``train.steps`` is set so that the time budget, not the step count, ends its run: a short probe run
measures its seconds per step, and ``train.steps`` becomes 1.15x (``--step-margin``) the steps that fit in M
minutes, so the cosine learning-rate decay of the recipes nearly completes in every arm (``--no-calibrate``:
train.steps = 10^6, and the learning rate barely decays).

Then, from each run's EMA weights: steps reached, seconds per training step, seconds per sample
(``--sample-steps`` steps of dpmpp_2m at the recipe's guidance, a batch of 64, the first stage's decoder
included), and the scores of ``latentdiff eval`` for text models of shapes (eval/prompted.py) on the same
held-out prompts for every arm (compositions never seen in training): prompt adherence per tag and overall, and
FID / precision / recall on the shapes oracle's features; beside them the real images' scores (the floor) and
the first stage's reconstructions of the real images (the ceiling of a latent model).

The first stage is trained once (recipe ``--first-stage-recipe``) unless ``--first-stage`` names one; its time
is reported apart: the latent model pays it once, and reuses it for every later model.

Writes DIR/ldm_vs_pixel.md (the table) and DIR/ldm_vs_pixel.json; the runs go to DIR/ldm_vs_pixel_runs/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ARMS = {  # name -> (label, which recipe, overrides)
    "latent_cache": ("latent f=4, cache on", "latent", ["latent.cache=true"]),
    "latent_nocache": ("latent f=4, cache off", "latent", ["latent.cache=false"]),
    "pixel": ("pixel f=1", "pixel", []),
}
SAMPLE_BATCH = 64
UNCAPPED_STEPS = 1_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="training minutes per arm (default: the latent "
                   "recipe's train.max_minutes)")
    p.add_argument("--first-stage", default=None, metavar="AE_DIR", help="an autoencoder run or model folder to reuse "
                   "(default: train --first-stage-recipe)")
    p.add_argument("--first-stage-recipe", default="shapes_vae_txt2img", help="recipe of the first stage to train")
    p.add_argument("--latent-recipe", default="shapes_ldm_txt2img")
    p.add_argument("--pixel-recipe", default="shapes_pixel_txt2img")
    p.add_argument("--set-first-stage", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the first-stage recipe (repeatable)")
    p.add_argument("--set-latent", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the latent recipe (repeatable)")
    p.add_argument("--set-pixel", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the pixel recipe (repeatable)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--per-tag", type=int, default=60, help="held-out prompts scored per object count")
    p.add_argument("--sample-steps", type=int, default=20, help="dpmpp_2m steps for the sample timing and the scores")
    p.add_argument("--sample-repeats", type=int, default=2, help="timed batches of 64 samples (the fastest counts)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help=f"train.steps={UNCAPPED_STEPS} instead of a probe-calibrated step count")
    p.add_argument("--probe-steps", type=int, default=12, help="steps of each calibration probe")
    p.add_argument("--step-margin", type=float, default=1.15, help="calibrated train.steps = this x the steps that "
                   "fit in the budget at the probe's speed (1.15: the cosine lr is at ~4%% of its peak when the time "
                   "is up; larger is safer on a machine whose load changes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default="outputs/bench", help="output folder")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: unknown arm(s) {unknown or args.arms!r}; choose from {', '.join(ARMS)}")
    if args.minutes is not None and args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    for name in ("per_tag", "sample_steps", "sample_repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.step_margin < 1:
        p.error(f"--step-margin must be >= 1, got {args.step_margin}")
    if args.probe_steps < 4:
        p.error(f"--probe-steps must be >= 4 (the first steps are warm-up), got {args.probe_steps}")
    args.arms = arms
    return args


# ---------------------------------------------------------------------------------------------- training


class StepClock:
    """A training callback that records the time after each optimizer step."""

    def __init__(self):
        self.t0, self.times = time.perf_counter(), []

    def __call__(self, step, metrics):
        self.times.append(time.perf_counter())

    def seconds_per_step(self, skip: int = 0) -> float:
        """Mean seconds per step from the end of step ``skip + 1`` to the last step."""
        t = self.times[skip:]
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else math.nan

    def setup_seconds(self) -> float:
        """Seconds from the call to the start of the first step (data, tokenizer, networks, latent cache)."""
        return self.times[0] - self.t0 - self.seconds_per_step() if len(self.times) > 1 else math.nan


def train_run(path, overrides: list[str], out: Path) -> tuple[StepClock, object, float]:
    """(clock, TrainResult, wall seconds) of training the config file ``path`` with ``overrides`` into a fresh
    ``out``."""
    from latentdiff.config import load_config
    from latentdiff.train.run import train_from_config

    if out.exists():
        shutil.rmtree(out)  # a fresh run each time: the times below are the whole run
    config = load_config(path, overrides)
    clock = StepClock()
    result = train_from_config(config, out, progress=True, callback=clock)
    return clock, result, time.perf_counter() - clock.t0


def calibrated_steps(path, overrides: list[str], out: Path, minutes: float, probe_steps: int, margin: float
                     ) -> tuple[int, dict]:
    """(train.steps, probe facts): ``margin`` x the steps that fit in ``minutes`` at the seconds per step that a
    probe run of ``probe_steps`` steps measures (its first two steps are warm-up and not counted)."""
    probe = ["train.max_minutes=0", f"train.steps={probe_steps}", "train.checkpoint_every=0", "train.sample_every=0",
             f"train.log_every={probe_steps}"]
    clock, _, _ = train_run(path, overrides + probe, out)
    shutil.rmtree(out, ignore_errors=True)
    s_step = clock.seconds_per_step(skip=2)
    steps = max(probe_steps, math.ceil(margin * 60.0 * minutes / s_step))
    return steps, {"seconds_per_step": s_step, "setup_seconds": clock.setup_seconds(), "steps": probe_steps}


def first_stage_seconds(folder: Path) -> float | None:
    """The training-loop seconds of an autoencoder run, summed from its metrics.csv (steps between log rows over
    ``steps_per_s``); None when the folder (or its parent, for a model folder) has none."""
    for path in (folder / "metrics.csv", folder.parent / "metrics.csv"):
        if path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("steps_per_s")]
            total, last = 0.0, 0
            for r in rows:
                step = int(float(r["step"]))
                total += (step - last) / float(r["steps_per_s"])
                last = step
            return total if rows else None
    return None


# ---------------------------------------------------------------------------------------------- evaluation


def seconds_per_sample(pipe, prompts: list[str], guidance: float, steps: int, repeats: int) -> float:
    """Seconds per image of a batch of 64 (``steps`` of dpmpp_2m at ``guidance``; decoded to pixels), fastest of
    ``repeats`` batches after a small warm-up call."""
    prompts = [prompts[i % len(prompts)] for i in range(SAMPLE_BATCH)]
    opts = dict(guidance=guidance, sampler="dpmpp_2m", seed=0, output="tensor")
    pipe.sample(2, prompts=prompts[:2], steps=2, batch_size=2, **opts)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.sample(SAMPLE_BATCH, prompts=prompts, steps=steps, batch_size=SAMPLE_BATCH, **opts)
        times.append(time.perf_counter() - t0)
    return min(times) / SAMPLE_BATCH


def world_of(config) -> dict:
    """The shapes world a text config trains on (its data options without the dataset length)."""
    world = dict(config.data.options)
    world.pop("length", None)
    return {"size": config.data.size, **world}


def evaluate_arm(run_dir: Path, oracle, oracle_info: dict, per_tag: int, sample_steps: int, repeats: int) -> dict:
    """Seconds per sample, and from ``latentdiff eval``'s scoring of text models (eval/prompted.py): adherence and
    FID / precision / recall of the EMA weights of ``run_dir`` on ``per_tag`` held-out prompts per object count,
    beside the real images (the floor) and, for a latent model, its first stage's reconstructions (the ceiling)."""
    import warnings

    from latentdiff.eval.prompted import evaluate_prompts, heldout_cases
    from latentdiff.pipeline import load

    pipe = load(run_dir)
    guidance = pipe.config.sample.guidance
    params = sum(p.numel() for p in pipe.unet.parameters())
    params += sum(p.numel() for p in pipe.conditioner.parameters()) if pipe.conditioner is not None else 0
    cases, _ = heldout_cases(pipe, 3 * per_tag)
    s_sample = seconds_per_sample(pipe, [c.prompt for c in cases], guidance, sample_steps, repeats)
    kw = dict(num=3 * per_tag, sampler="dpmpp_2m", steps=sample_steps, guidance=guidance, seed=0,
              batch_size=SAMPLE_BATCH, net_info=oracle_info)
    metrics = ["adherence", "fid", "pr"]
    try:
        scores = evaluate_prompts(pipe, oracle, oracle, metrics=metrics, **kw)
    except ValueError as e:  # FID's matrix square root fails with far fewer images than the oracle has features
        if not str(e).startswith("FID"):
            raise
        warnings.warn(f"{run_dir}: {e} (only {3 * per_tag} images); scoring again without FID", RuntimeWarning,
                      stacklevel=2)
        metrics.remove("fid")
        scores = evaluate_prompts(pipe, oracle, oracle, metrics=metrics, **kw)
    adherence, ceiling = scores["adherence"], scores.get("ceiling") or {}
    return {"guidance": guidance, "params": params, "seconds_per_sample": s_sample,
            "space": "x".join(map(str, pipe.sample_shape)),
            "model": adherence["model"], "real": adherence["real"], "ceiling": adherence["ceiling"],
            **{m: {"model": scores["model"].get(m), "floor": scores["floor"].get(m), "ceiling": ceiling.get(m)}
               for m in ("fid", "precision", "recall")}}


# ---------------------------------------------------------------------------------------------- report


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ratio(a, b) -> str:
    numbers = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b))
    if not numbers or not b:
        return "-"
    return f"{a / b:.2f}"


def table(results: dict, first_stage: dict, minutes: float, sample_steps: int, threads: int) -> str:
    """The markdown table: one column per arm, the real data's floor, and latent / pixel ratios."""
    arms = list(results)
    latent = [a for a in arms if a.startswith("latent")]
    ratio_of = latent if "pixel" in arms else []
    tags = list(next(iter(results.values()))["model"])
    head = ["", *(ARMS[a][0] for a in arms), *(f"{ARMS[a][0]} / pixel" for a in ratio_of), "real data",
            "f=4 first stage (b)"]

    def row(name, key, fmt, floor="", ceiling=""):
        values = [key(results[a]) for a in arms]
        ratios = [_ratio(key(results[a]), key(results["pixel"])) for a in ratio_of]
        return [name, *(_num(v, fmt) for v in values), *ratios, floor, ceiling]

    one = next(iter(results.values()))
    lat = results[latent[0]] if latent else None  # the latent arms share their first stage, hence its ceiling
    rows = [
        row("latents / pixels the U-Net denoises", lambda r: r["space"], "s"),
        row("parameters (U-Net + text encoder), M", lambda r: r["params"] / 1e6, ".2f"),
        row("training steps reached", lambda r: r["steps"], "d"),
        row("train.steps (the cap; calibrated to end after the time budget)", lambda r: r["step_cap"], "d"),
        row("training loop, s", lambda r: r["train_seconds"], ".0f"),
        row("s / training step (batch 64)", lambda r: r["seconds_per_step"], ".3f"),
        row("setup before the first step, s (a)", lambda r: r["setup_seconds"], ".1f"),
        row(f"s / sample ({sample_steps} dpmpp_2m steps, batch 64, with decode)", lambda r: r["seconds_per_sample"],
            ".4f"),
    ]
    for t in tags:
        ceiling = lat["ceiling"][t]["rate"] if lat and lat.get("ceiling") else None
        rows.append(row(f"adherence, {t}", lambda r, t=t: r["model"][t]["rate"], ".1%",
                        f"{one['real'][t]['rate']:.1%}", _num(ceiling, ".1%")))
    for m, fmt in (("fid", ".4g"), ("precision", ".3f"), ("recall", ".3f")):
        rows.append(row(f"{'FID' if m == 'fid' else m} (oracle features)", lambda r, m=m: r[m]["model"], fmt,
                        _num(one[m]["floor"], fmt), _num(lat[m]["ceiling"] if lat else None, fmt)))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
    n = one["model"]["overall"]["count"]
    lines += ["", f"Each arm trained for {minutes:g} min of training loop on {threads} thread(s); guidance "
              f"{one['guidance']:g}; {n} held-out prompts (compositions never seen in training), the same for every "
              "arm. Ratios are latent / pixel (below 1: the latent arm is faster, or has the lower FID).",
              "Real data: adherence of the real images of the same prompts (the oracle's own ceiling); feature "
              "metrics between a second set of real images and the first (the floor).",
              "(a) Data, tokenizer and networks, and for the cache-on arm building the latent cache (or loading it, "
              "when an earlier run with the same data and first stage built it); not part of the training time.",
              "(b) The same real images through the first stage, D(E(x)): what a perfect latent model could reach.",
              f"First stage (paid once by every latent model): {first_stage['note']}."]
    return "\n".join(lines)


def write_json(out: Path, args, minutes: float, first_stage: dict, recipes: dict, sets: dict, results: dict) -> None:
    """DIR/ldm_vs_pixel.json: the settings and every figure of the arms done so far."""
    summary = {"minutes": minutes, "threads": args.threads, "sample_steps": args.sample_steps,
               "per_tag": args.per_tag, "calibrated": args.calibrate, "first_stage": first_stage,
               "recipes": {k: str(v) for k, v in recipes.items()}, "overrides": sets, "arms": results,
               "command": " ".join(sys.argv)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ldm_vs_pixel.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    from latentdiff.config import load_config
    from latentdiff.eval.feature_networks import feature_network
    from latentdiff.recipes import find_recipe

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = out / "ldm_vs_pixel_runs"
    recipes = {"latent": find_recipe(args.latent_recipe), "pixel": find_recipe(args.pixel_recipe)}
    sets = {"latent": args.set_latent, "pixel": args.set_pixel}
    configs = {k: load_config(recipes[k], sets[k]) for k in recipes}  # bad overrides fail here, before training
    minutes = args.minutes if args.minutes is not None else configs["latent"].train.max_minutes
    if not minutes:
        raise SystemExit(f"{recipes['latent']}: train.max_minutes is 0; give --minutes")
    worlds = {k: world_of(c) for k, c in configs.items()}
    if worlds["latent"] != worlds["pixel"]:
        raise SystemExit(f"the recipes train on different shapes worlds ({worlds['latent']} vs {worlds['pixel']}); "
                         "their adherence would not be comparable")

    first_stage = {}
    if any(ARMS[a][1] == "latent" for a in args.arms):
        if args.first_stage is not None:
            ae_dir = Path(args.first_stage)
            if not ae_dir.is_dir():
                raise SystemExit(f"--first-stage: {ae_dir} is not a folder")
            sec = first_stage_seconds(ae_dir)
            first_stage = {"path": str(ae_dir), "seconds": sec, "note": f"reused from {ae_dir}" + (
                f", trained in ~{sec:.0f} s (its metrics.csv)" if sec is not None else "")}
        else:
            ae_dir = runs / "first_stage"
            print(f"[bench] training the first stage ({args.first_stage_recipe}) ...", flush=True)
            clock, result, wall = train_run(find_recipe(args.first_stage_recipe), args.set_first_stage, ae_dir)
            first_stage = {"path": str(ae_dir), "seconds": wall, "steps": result.step,
                           "note": f"{args.first_stage_recipe} trained here in {wall:.0f} s ({result.step} steps, "
                                   "with its export and held-out check)"}
        sets["latent"] = [f"latent.first_stage={ae_dir}", *sets["latent"]]
    else:
        first_stage = {"note": "not used (no latent arm)"}

    print("[bench] loading the shapes oracle (trained on first use) ...", flush=True)
    oracle, oracle_info = feature_network("oracle", dataset_name="shapes")
    oracle.eval()

    results = {}
    for arm in args.arms:
        label, kind, arm_sets = ARMS[arm]
        overrides = [*sets[kind], *arm_sets, f"train.max_minutes={minutes}", "train.sample_every=0"]
        probe = None
        steps = UNCAPPED_STEPS
        if args.calibrate:
            print(f"[bench] {label}: probe of {args.probe_steps} steps ...", flush=True)
            steps, probe = calibrated_steps(recipes[kind], overrides, runs / f"{arm}_probe", minutes, args.probe_steps,
                                            args.step_margin)
        print(f"[bench] {label}: training for {minutes:g} min (train.steps={steps}) ...", flush=True)
        clock, result, wall = train_run(recipes[kind], [*overrides, f"train.steps={steps}"], runs / arm)
        if result.step >= steps:
            print(f"[bench] warning: {label} reached train.steps={steps} before the time budget was spent (the probe "
                  "ran slower than the run: the machine's load changed); rerun with a larger --step-margin",
                  flush=True)
        print(f"[bench] {label}: evaluating ...", flush=True)
        s_step = clock.seconds_per_step()
        results[arm] = {
            "steps": result.step, "step_cap": steps, "seconds_per_step": s_step,
            "train_seconds": clock.times[-1] - clock.times[0] + s_step,
            # the first run of the arm (the probe, when calibrating) is the one that builds the latent cache
            "setup_seconds": clock.setup_seconds() if probe is None else probe["setup_seconds"],
            "wall_seconds": wall, "probe": probe,
            **evaluate_arm(runs / arm, oracle, oracle_info, args.per_tag, args.sample_steps, args.sample_repeats),
        }
        write_json(out, args, minutes, first_stage, recipes, sets, results)  # after each arm: nothing is lost

    text = table(results, first_stage, minutes, args.sample_steps, args.threads)
    (out / "ldm_vs_pixel.md").write_text(text + "\n")
    print(text)
    print(f"[bench] wrote {out / 'ldm_vs_pixel.md'} and {out / 'ldm_vs_pixel.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
