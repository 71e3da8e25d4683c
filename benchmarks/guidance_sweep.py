"""Prompt adherence, FID and precision / recall against the classifier-free guidance scale, in one table.

    .venv/bin/python benchmarks/guidance_sweep.py MODEL [--guidance 1,2,3,5,7] [--num 300] [--steps S]
        [--sampler X] [--seed 0] [--oracle DIR] [--out FILE.md] [--device cuda] [--quiet]

For a text model of the shapes world: per guidance scale s (ε̃ = ε_u + s·(ε_c − ε_u), Ho & Salimans 2022; s = 1 is
the conditional model alone), ``--num`` held-out prompts drawn once each (the same prompts and seeds at every
scale), scored as `latentdiff eval` scores them: adherence per number of objects and overall, FID and precision /
recall on the shapes oracle's features against the real images of the prompts. For a class-conditional model:
the oracle's class accuracy, FID and precision / recall against the training data. The last rows are what real
data scores (the floor: the oracle on the real images of the prompts; other real images against them) and, for
a latent model, the first stage's ceiling (the same with the real images replaced by their reconstructions
D(E(x))); neither depends on the guidance scale.

Prints the markdown table and writes it to ``--out`` (default MODEL/eval/guidance_sweep.md), with every figure
in a JSON file beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_scales(text: str) -> list[float]:
    """"1,2,3.5" -> [1.0, 2.0, 3.5]; each scale >= 1 (below 1 guidance steers away from the prompt)."""
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales or min(scales) < 0:
        raise ValueError(f"--guidance: expected comma-separated scales >= 0, e.g. 1,2,3,5,7; got {text!r}")
    return scales


def _pct(entry) -> str:
    return "-" if not entry else f"{entry['rate']:.1%}"


def _f(d, key, spec) -> str:
    return "-" if not d or d.get(key) is None else format(d[key], spec)


def markdown(rows: list[dict], floor: dict, ceiling: dict | None, tags: list[str], oracle_accuracy=None) -> str:
    """The table: one line per guidance scale, then the floor and (latent models) the ceiling."""
    cols = ["guidance"] + (tags if tags else ["class accuracy"]) + ["FID", "precision", "recall", "s / image"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]

    def line(name, adherence, metrics, seconds):
        cells = [name]
        cells += [_pct((adherence or {}).get(t)) for t in tags] if tags else [_f(metrics, "accuracy", ".3f")]
        fid = (metrics or {}).get("fid")
        cells += ["-" if fid is None else f"{fid:.1f}" if abs(fid) >= 100 else f"{fid:.3f}"]
        cells += [_f(metrics, "precision", ".3f"), _f(metrics, "recall", ".3f"), seconds]
        lines.append("| " + " | ".join(cells) + " |")

    for r in rows:
        line(f"{r['guidance']:g}", r["adherence"], r["model"], f"{r['seconds_per_image']:.3f}")
    floor_metrics = dict(floor["model"] or {})
    if not tags and oracle_accuracy is not None:
        floor_metrics["accuracy"] = oracle_accuracy
    line("real images (floor)", floor["adherence"], floor_metrics, "-")
    if ceiling is not None:
        line("first-stage ceiling", ceiling["adherence"], ceiling["model"], "-")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="run or model folder: a text model of the shapes world or a class-conditional one")
    ap.add_argument("--guidance", default="1,2,3,5,7", help="comma-separated guidance scales (default: 1,2,3,5,7)")
    ap.add_argument("--num", type=int, default=300, help="held-out prompts (text) or samples (class) per scale")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    ap.add_argument("--sampler", default=None, help="sampler (default: the config's)")
    ap.add_argument("--seed", type=int, default=None, help="image i uses seed + i; prompts of world seed S")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the config's)")
    ap.add_argument("--oracle", default=None, help="oracle folder (default: the cached oracle of the model's data)")
    ap.add_argument("--cache", default=None, help="cache folder (default: $LATENTDIFF_CACHE, else ~/.cache/latentdiff)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=None, help="markdown file to write (default: MODEL/eval/guidance_sweep.md)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from latentdiff.errors import UserError

    try:
        return sweep(args, parse_scales(args.guidance))
    except (UserError, ValueError, OSError) as e:  # a bad option, a missing model or oracle: one line
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(args, scales: list[float]) -> int:
    from latentdiff.devices import default_device
    from latentdiff.errors import RequestError
    from latentdiff.eval import run as ev
    from latentdiff.fileio import atomic_write_text
    from latentdiff.pipeline import load

    if args.num < 4:
        raise ValueError(f"--num must be >= 4 (precision and recall use 3 nearest neighbours), got {args.num}")
    device = default_device(args.device)
    pipe = load(args.model, device=device)
    text = ev.scores_prompts(pipe)
    if pipe.conditioning is None or (pipe.conditioning == "text" and not text):
        raise RequestError(f"{args.model}: the guidance sweep scores a text model of the shapes world or a "
                           f"class-conditional model; this one is {pipe.conditioning or 'unconditional'}"
                           f"{'' if pipe.conditioning is None else ' on ' + repr(pipe.config.data.name)}")
    progress = not args.quiet
    net, info = ev.feature_network("oracle", oracle_path=args.oracle, dataset_name=pipe.config.data.name,
                                   cache=args.cache, device=device, verbose=progress)
    oracle = ev.adherence_oracle(net, oracle_path=args.oracle, cache=args.cache, device=device) if text else None
    ref = None if text else ev.load_reference(None, net, pipe=pipe, cache=args.cache, device=device, progress=progress)
    metrics = ["adherence", "fid", "pr"] if text else ["fid", "pr"]
    rows, first = [], None
    for i, g in enumerate(scales):
        t0 = time.perf_counter()
        r = ev.evaluate_model(pipe, net, ref, metrics=metrics, num=args.num, sampler=args.sampler, steps=args.steps,
                              guidance=g, seed=args.seed, batch_size=args.batch_size, device=device, progress=progress,
                              net_info=info, oracle=oracle, ceiling=(i == 0))  # floor and ceiling: once
        first = first or r
        adh = (r.get("adherence") or {}).get("model")
        rows.append({"guidance": g, "model": r["model"], "adherence": adh, "nfe": r["nfe"],
                     "sample_seconds": r["sample_seconds"], "seconds_per_image": r["sample_seconds"] / args.num})
        shown = f"adherence {adh['overall']['rate']:.1%}, " if adh else ""
        print(f"guidance {g:g}: {shown}FID {r['model']['fid']:.3f}, precision {r['model']['precision']:.3f}, "
              f"recall {r['model']['recall']:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    adherence = first.get("adherence") or {}
    floor = {"model": first["floor"], "adherence": adherence.get("real")}
    ceiling = None
    if first.get("ceiling") or adherence.get("ceiling"):
        ceiling = {"model": first.get("ceiling"), "adherence": adherence.get("ceiling")}
    tags = list(adherence.get("model") or {})
    table = markdown(rows, floor, ceiling, tags, info.get("oracle_accuracy"))
    s = first["sampling"]
    what = "held-out prompts (one image each)" if text else "samples (classes in turn)"
    title = (f"{args.model}: {args.num} {what}, {s['sampler']} {s['steps']} steps, seed {s['seed']}; "
             f"{info['name']} features; {device}")
    print(f"\n{title}\n\n{table}\n")
    out = Path(args.out) if args.out else Path(args.model) / "eval" / "guidance_sweep.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, f"{title}\n\n{table}\n")
    ev.write_json(out.with_suffix(".json"), {
        "model": str(args.model), "num": args.num, "guidance": scales, "sampling": s, "features": info,
        "reference": first["reference"], "prompts": first.get("prompts"), "results": rows, "floor": floor,
        "ceiling": ceiling, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
