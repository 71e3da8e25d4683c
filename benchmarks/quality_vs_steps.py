"""Sample quality against sampling steps, one line per sampler, on the digits demo model.

For ddpm at 1000 steps, ddim at 10, 20, 50, 100, dpmpp_2m and unipc at 5, 10, 20, heun at 10, 20: FID and
KID with the digits oracle's features against the model's training digits, the oracle's class accuracy
(class-conditional models; labels cycle over the classes), network calls per image and sampling time.
The real floor (the same metrics between two disjoint parts of the real digits, same N) is printed beside
them. Prints a markdown table and writes QUALITY.png (FID against steps, log x, one line per sampler, as
Rombach et al. 2022 plot quality against sampling steps in their Figure 7), QUALITY.json and QUALITY.md.
Steps beyond the model's T are lowered to T (said so in the output).

    make demo-digits                             # trains outputs/demo_digits/run
    .venv/bin/python benchmarks/quality_vs_steps.py [--model outputs/demo_digits/run] [--num 500] [--guidance G]
        [--out outputs/bench] [--grid "ddim:10,20;heun:10"] [--device cuda] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

GRID = {"ddpm": [1000], "ddim": [10, 20, 50, 100], "dpmpp_2m": [5, 10, 20], "unipc": [5, 10, 20], "heun": [10, 20]}
STEM = "quality_vs_steps"


def parse_grid(text: str) -> dict[str, list[int]]:
    """"ddim:10,20;heun:10" -> {"ddim": [10, 20], "heun": [10]}."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, steps = part.partition(":")
        try:
            values = [int(v) for v in steps.split(",") if v.strip()]
        except ValueError:
            values = []
        if not sep or not values or min(values) < 1:
            raise ValueError(f"bad --grid entry {part!r}: expected sampler:steps[,steps...], e.g. ddim:10,20")
        grid[name.strip()] = values
    if not grid:
        raise ValueError("--grid is empty")
    return grid


def clamp_grid(grid: dict[str, list[int]], T: int) -> tuple[list[tuple[str, int]], list[str]]:
    """(sampler, steps) runs with steps lowered to T where larger (duplicates dropped), and notes saying so."""
    runs, notes = [], []
    for sampler, steps in grid.items():
        for n in steps:
            if n > T:
                notes.append(f"{sampler} {n} steps -> {T}: the model has T = {T} training steps")
                n = T
            if (sampler, n) not in runs:
                runs.append((sampler, n))
    return runs, notes


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict], floor: dict | None, oracle_acc) -> str:
    lines = ["| sampler | steps | NFE | FID | KID x 1e3 | class accuracy | sampling s | images/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        kid = f"{r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}"
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']:.0f} | {r['fid']:.3f} | {kid} | "
                     f"{fmt(r.get('accuracy'), '.3f')} | {r['sample_seconds']:.1f} | {r['images_per_second']:.1f} |")
    if floor:
        kid = f"{floor['kid_mean'] * 1e3:.2f} ± {floor['kid_std'] * 1e3:.2f}"
        lines.append(f"| real data (floor, {floor['n_fake']} vs {floor['n_real']}) | - | - | {floor['fid']:.3f} "
                     f"| {kid} | "
                     f"{fmt(oracle_acc, '.3f')} | - | - |")
    return "\n".join(lines)


def plot(rows: list[dict], floor: dict | None, path: Path, title: str) -> None:
    """FID against steps, log x, one line (with markers) per sampler, the floor as a dotted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["sampler"] == sampler)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
    if floor:
        ax.axhline(floor["fid"], color="grey", linestyle=":", label="real data (floor)")
    ax.set_xscale("log")
    ticks = sorted({r["steps"] for r in rows})
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (oracle features)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from latentdiff.fileio import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="outputs/demo_digits/run",
                    help="run or model folder (default: outputs/demo_digits/run, the digits demo's run)")
    ap.add_argument("--num", type=int, default=500, help="samples per (sampler, steps) (default: 500)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model config's)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the config's)")
    ap.add_argument("--grid", default=None,
                    help='the runs, e.g. "ddim:10,20;heun:10" (default: the list in this file\'s docstring)')
    ap.add_argument("--oracle", default=None,
                    help="oracle folder (default: the digits oracle in the cache, trained on first use)")
    ap.add_argument("--cache", default=None, help="cache folder (default: $LATENTDIFF_CACHE or ~/.cache/latentdiff)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else mps, else cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, leave as is)")
    ap.add_argument("--out", default="outputs/bench",
                    help=f"folder for {STEM}.png, .json and .md (default: outputs/bench)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    args = ap.parse_args(argv)

    model = Path(args.model)
    if not (model / "config.yaml").is_file():
        print(f"no trained model at {model}: run `make demo-digits` first (it trains outputs/demo_digits/run), "
              "or pass --model RUN_OR_MODEL_DIR", file=sys.stderr)
        return 2
    try:
        grid = parse_grid(args.grid) if args.grid else GRID
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    from latentdiff.samplers import SAMPLERS

    unknown = [s for s in grid if s not in SAMPLERS]
    if unknown or args.num < 2:
        print(f"error: unknown sampler(s) {unknown}" if unknown else "error: --num must be >= 2", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return sweep(args, model, grid)
    except (ValueError, OSError) as e:  # bad option for this model, missing oracle or data: one line
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(args, model: Path, grid: dict[str, list[int]]) -> int:
    import torch

    from latentdiff.devices import default_device
    from latentdiff.eval import run as ev
    from latentdiff.fileio import atomic_write_text
    from latentdiff.pipeline import load

    device = default_device(args.device)
    pipe = load(model, device=device)
    runs, notes = clamp_grid(grid, pipe.diffusion.num_steps)
    for note in notes:
        print(f"note: {note}")
    progress = not args.quiet
    net, info = ev.feature_network("oracle", oracle_path=args.oracle, dataset_name=pipe.config.data.name,
                                   cache=args.cache, device=device)
    ref = ev.load_reference(None, net, pipe=pipe, cache=args.cache, device=device, progress=progress)
    guidance = pipe.config.sample.guidance if args.guidance is None else args.guidance
    print(f"model {model} on {device}: {args.num} samples per run, guidance {guidance:g}; reference: "
          f"{ref.info['name']} ({ref.info['split']}), {ref.info['n']} images", flush=True)

    rows, floor = [], None
    for sampler, steps in runs:
        t0 = time.perf_counter()
        r = ev.evaluate_model(pipe, net, ref, metrics=["fid", "kid"], num=args.num, sampler=sampler, steps=steps,
                              guidance=guidance, seed=args.seed, batch_size=args.batch_size, device=device,
                              progress=progress, net_info=info)
        m, floor = r["model"], r["floor"]
        rows.append({"sampler": sampler, "steps": steps, "nfe": r["nfe"], "fid": m["fid"], "kid_mean": m["kid_mean"],
                     "kid_std": m["kid_std"], "accuracy": m.get("accuracy"), "sample_seconds": r["sample_seconds"],
                     "images_per_second": args.num / max(r["sample_seconds"], 1e-9)})
        acc = f", accuracy {m['accuracy']:.3f}" if "accuracy" in m else ""
        print(f"{sampler:>10} {steps:>5} steps: FID {m['fid']:.3f}, KID {m['kid_mean'] * 1e3:.2f}e-3{acc}, "
              f"{r['sample_seconds']:.1f} s sampling ({time.perf_counter() - t0:.1f} s in all)", flush=True)

    table = markdown(rows, floor, info.get("oracle_accuracy"))
    print()
    print(table)
    out = Path(args.out)
    title = f"{model}: N = {args.num}, guidance {guidance:g}, {info['name']} features, {device}"
    plot(rows, floor, out / f"{STEM}.png", title)
    result = {"model": str(model), "num": args.num, "guidance": guidance, "seed": args.seed, "device": str(device),
              "torch_threads": torch.get_num_threads(), "features": info, "reference": ref.info, "floor": floor,
              "notes": notes, "results": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    ev.write_json(out / f"{STEM}.json", result)
    atomic_write_text(out / f"{STEM}.md", f"{title}\n\n{table}\n")
    print(f"\nwrote {out / STEM}.png, .json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
