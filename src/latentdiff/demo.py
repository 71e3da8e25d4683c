"""`make demo`: text-to-image latent diffusion learns the shapes world on a CPU, from nothing.

1. trains the first stage (a KL-f4 autoencoder, recipe ``shapes_vae_txt2img``) on 32x32 shapes with 1-3 objects,
   while a second process trains the shapes oracle that scores the samples (once; it is cached);
2. trains the text-to-image latent diffusion model (recipe ``shapes_ldm_txt2img``): a word-level text encoder τ_θ
   and a U-Net whose spatial transformers cross-attend to τ_θ(y), trained jointly on cached latents, with 10%
   empty prompts for classifier-free guidance;
3. draws a grid, one row per prompt and one column per seed; the prompts describe compositions of the test split,
   which the model never saw (the recipe holds out whole captions: ``split_by: composition``);
4. prints prompt adherence per number of objects (the oracle reads every object back: shape, colour and cell, and
   no extra object), beside the oracle's score on the real images of the same prompts, and FID / precision /
   recall on the oracle's features beside the same metrics between two sets of real images.

Writes outputs/demo/txt2img_grid.png (PNG text chunks hold the prompts and settings), outputs/demo/summary.json,
and the run folders outputs/demo/first_stage and outputs/demo/run (sample more with `latentdiff sample`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

FIRST_STAGE_RECIPE = "shapes_vae_txt2img"
LDM_RECIPE = "shapes_ldm_txt2img"


def start_oracle(epochs: int | None) -> subprocess.Popen | None:
    """Train the shapes oracle in a second process on one thread, unless it is cached; None when cached."""
    from .eval.shapes_oracle import CONFIG_FILE
    from .eval.stats_cache import cache_root

    if (cache_root() / "oracles" / "shapes" / CONFIG_FILE).is_file():  # what shapes_oracle_cached looks for
        return None
    cmd = [sys.executable, "-m", "latentdiff.cli", "oracle", "shapes"]
    cmd += [] if epochs is None else ["--epochs", str(epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print("[demo] training the shapes oracle in a second process (cached after this run) ...", flush=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_oracle(proc: subprocess.Popen | None):
    """Wait for the oracle process and load the oracle (eval mode)."""
    from .eval.feature_networks import shapes_oracle_cached

    if proc is not None:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"training the shapes oracle failed:\n{out}")
        print("[demo] " + out.strip().splitlines()[-1], flush=True)
    return shapes_oracle_cached(verbose=False).eval()


def train_stage(recipe: str, out: Path, overrides: list[str], callback=None) -> float:
    """Train ``recipe`` into a fresh run folder ``out``; returns the seconds it took."""
    from .config import load_config
    from .recipes import find_recipe
    from .train.run import train_from_config

    if out.exists():
        shutil.rmtree(out)  # a fresh run each time: the time below is the whole training
    config = load_config(find_recipe(recipe), overrides)
    print(f"[demo] training {recipe} for {config.train.steps} steps on {torch.get_num_threads()} thread(s) ...",
          flush=True)
    t0 = time.perf_counter()
    train_from_config(config, out, progress=True, callback=callback)
    return time.perf_counter() - t0


def train_parallel(recipe: str, out: Path, overrides: list[str], processes: int) -> float:
    """Train ``recipe`` data-parallel in ``processes`` processes of one thread each (torch.distributed.run on
    the CPU, gloo): on a small model, two single-threaded processes outrun one process with two threads."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "latentdiff.cli", "train", recipe, "--out", str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"[demo] training {recipe} in {processes} data-parallel processes of one thread ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training {recipe} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def grid_prompts(cases, per_tag: int) -> list[str]:
    """The first ``per_tag`` distinct held-out prompts of each object count."""
    out, seen = [], {}
    for c in cases:
        if seen.get(c.tag, 0) < per_tag and c.prompt not in out:
            out.append(c.prompt)
            seen[c.tag] = seen.get(c.tag, 0) + 1
    return out


def draw_grid(pipe, prompts: list[str], seeds: int, path: Path, guidance: float, steps: int) -> None:
    """One row per prompt, one column per seed, with the generation parameters in the PNG."""
    from PIL import Image

    from .pngmeta import save_png
    from .train.logging import make_grid

    rows = [pipe.sample(seeds, prompts=[p], guidance=guidance, steps=steps, seed=0, output="tensor") for p in prompts]
    images = torch.nn.functional.interpolate(torch.cat(rows), scale_factor=2, mode="nearest")
    params = {"model": str(path.parent / "run"), "prompt": prompts, "seeds": list(range(seeds)), "guidance": guidance,
              "steps": steps, "sampler": pipe.config.sample.sampler, "rows": "prompts", "columns": "seeds"}
    save_png(Image.fromarray(make_grid(images, nrow=seeds)), path, params)


def score(pipe, oracle, num: int, guidance: float) -> dict:
    """``latentdiff eval``'s scoring of a text model (``eval.prompted.evaluate_prompts``): adherence on ``num``
    held-out prompts beside the real images of the same prompts, and FID / precision / recall on the oracle's
    features beside the floor (the same prompts drawn again) and the first stage's ceiling."""
    from .eval.prompted import evaluate_prompts

    return evaluate_prompts(pipe, oracle, oracle, metrics=["adherence", "fid", "pr"], num=num, guidance=guidance,
                            seed=0, batch_size=64, net_info={"name": "oracle:shapes"})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads once the oracle is trained")
    p.add_argument("--processes", type=int, default=2,
                   help="data-parallel processes (one thread each) for the text-to-image model; 1 = in this process")
    p.add_argument("--per-tag", type=int, default=60, help="held-out prompts scored per object count")
    p.add_argument("--grid-per-tag", type=int, default=3, help="grid rows per object count")
    p.add_argument("--seeds", type=int, default=8, help="grid columns (seeds)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the recipe's)")
    p.add_argument("--oracle-epochs", type=int, default=None, help="epochs of the shapes oracle (default: its own)")
    p.add_argument("--first-stage", action="append", default=[], metavar="key=value",
                   help="override of the first-stage recipe (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the text-to-image recipe")
    return p.parse_args(argv)


def train_models(args, out: Path) -> tuple[float, float, torch.nn.Module]:
    """Both stages (the first stage, then the text-to-image model) while the oracle trains beside them;
    returns their seconds and the oracle, with torch at ``args.threads`` threads."""
    oracle_proc = start_oracle(args.oracle_epochs)
    torch.set_num_threads(1 if oracle_proc is not None else args.threads)
    t_ae = train_stage(FIRST_STAGE_RECIPE, out / "first_stage", args.first_stage)

    def more_threads(step, metrics):  # the oracle's core is free once it is done
        if oracle_proc is not None and oracle_proc.poll() is not None and torch.get_num_threads() != args.threads:
            torch.set_num_threads(args.threads)

    overrides = [f"latent.first_stage={out / 'first_stage'}", *args.overrides]
    if args.processes > 1:
        t_ldm = train_parallel(LDM_RECIPE, out / "run", overrides, args.processes)
    else:
        t_ldm = train_stage(LDM_RECIPE, out / "run", overrides, callback=more_threads)
    oracle = finish_oracle(oracle_proc)
    torch.set_num_threads(args.threads)
    return t_ae, t_ldm, oracle


def report(out: Path, seconds: dict, sample, guidance: float, result: dict) -> None:
    """Write ``out``/summary.json (``seconds`` rounded to 0.1 s) and print the timings, the adherence table and
    the metrics on the oracle's features. ``sample`` is the model config's sample section."""
    from .eval.adherence import OVERALL
    from .eval.report import format_table

    adherence = result["adherence"]
    summary = {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "sampler": sample.sampler, "steps": sample.steps, "guidance": guidance,
        "adherence": {"model": adherence["model"], "real_images": adherence["real"],
                      "first_stage_ceiling": adherence["ceiling"]},
        **{name: {column: result[column][name] for column in ("model", "floor", "ceiling") if column in result}
           for name in ("fid", "precision", "recall")},
        "grid": str(out / "txt2img_grid.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[demo] training {seconds['training_total']:.0f} s (first stage {seconds['first_stage']:.0f} s, "
          f"text-to-image {seconds['txt2img']:.0f} s); total {seconds['total'] / 60:.1f} min")
    print(f"[demo] grid: {out / 'txt2img_grid.png'} (rows: held-out prompts, columns: seeds)")
    print(f"[demo] {sample.sampler}, {sample.steps} steps, guidance {guidance:g}; "
          "prompts of compositions never seen in training:")
    print(format_table(result))
    print(f"[demo] overall adherence {adherence['model'][OVERALL]['rate']:.1%}")


def main(argv=None) -> int:
    args = parse_args(argv)

    from .eval.prompted import heldout_cases
    from .pipeline import load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    t_ae, t_ldm, oracle = train_models(args, out)
    t_train = time.perf_counter() - t_start

    pipe = load(out / "run")
    s = pipe.config.sample
    guidance = s.guidance if args.guidance is None else args.guidance
    cases, _ = heldout_cases(pipe, 3 * args.per_tag, seed=0)  # the prompts `score` draws too
    t0 = time.perf_counter()
    draw_grid(pipe, grid_prompts(cases, args.grid_per_tag), args.seeds, out / "txt2img_grid.png", guidance, s.steps)
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score(pipe, oracle, 3 * args.per_tag, guidance)
    t_eval = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    seconds = {"first_stage": t_ae, "txt2img": t_ldm, "training_total": t_train, "grid": t_grid, "eval": t_eval,
               "total": total}
    report(out, seconds, s, guidance, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
