"""The figures and grids of docs/tasks.md: layout-to-image, semantic synthesis and sampling beyond the training size.

    python benchmarks/spatial_tasks.py --semantic runs/shapes_ldm_semantic --layout runs/shapes_ldm_layout \
        --text runs/shapes_ldm_txt2img --out docs/images/tasks --num 100

Writes the inputs (held-out maps as palette PNGs at 32x32, 64x128 and 128x256; held-out layouts as JSON, and a
2x4 tiling of layouts for 64x128), then runs the commands the docs show, each printed before it runs:
`latentdiff sample` (grids with each input beside its samples) and `latentdiff eval --metrics miou / layout`
(tables). A text or class model given with --text / --class is sampled at 32x32 and 64x128 for the caveat on
unconditional and text models away from the training size. Every model is optional.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from latentdiff import cli
from latentdiff.data.shapes import ShapesConfig
from latentdiff.eval.spatial_scores import heldout_maps
from latentdiff.layouts import heldout_layouts, tile_layouts, to_objects
from latentdiff.segmaps import write_map

SIZES = ((32, 32), (64, 128), (128, 256))


def run(*args) -> None:
    line = "latentdiff " + " ".join(shlex.quote(str(a)) for a in args)
    print(f"\n$ {line}", flush=True)
    t0 = time.perf_counter()
    rc = cli.main([str(a) for a in args])
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
    if rc != 0:
        sys.exit(rc)


def inputs(out: Path, config: ShapesConfig) -> dict:
    """Held-out maps and layouts as the files the commands read."""
    files = {}
    for i, (h, w) in enumerate(SIZES):
        _, maps = heldout_maps(1, (h, w), 32, config, seed=100 + i)
        files[f"map_{h}x{w}"] = write_map(out / f"map_{h}x{w}.png", maps[0], config)
    layouts = heldout_layouts(3, seed=100, min_objects=2, max_objects=3, config=config)
    files["layouts"] = out / "layouts.json"
    files["layouts"].write_text(json.dumps([to_objects(lay, config) for lay in layouts], indent=1) + "\n")
    # 64x128 as a 2x4 grid of 32x32 tiles: one held-out object in each of three tiles (a model takes at most
    # max_objects = 3), the other tiles empty.
    tiles = heldout_layouts(8, seed=101, min_objects=1, max_objects=1, config=config)
    tiles[[1, 2, 4, 6, 7], :, 0] = -1.0
    wide = tile_layouts(tiles, 2, 4)
    files["layout_wide"] = out / "layout_64x128.json"
    files["layout_wide"].write_text(json.dumps(to_objects(wide, config), indent=1) + "\n")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--semantic", default=None, help="run or model folder of shapes_ldm_semantic")
    p.add_argument("--layout", default=None, help="run or model folder of shapes_ldm_layout")
    p.add_argument("--text", default=None, help="a text model of the shapes world (the caveat's pictures)")
    p.add_argument("--class", dest="class_model", default=None, help="a class model (the caveat's pictures)")
    p.add_argument("--out", default="docs/images/tasks", help="folder of the grids and inputs")
    p.add_argument("--num", type=int, default=100, help="images per eval figure")
    p.add_argument("--layout-num", type=int, default=None,
                   help="held-out layouts of the layout figure (default: --num)")
    p.add_argument("--eval-dir", default=None, help="folder of the eval JSON files (default: --out)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evals = Path(args.eval_dir or out)
    files = inputs(out, ShapesConfig())
    q = "--quiet"
    if args.semantic:
        for h, w in SIZES:
            run("sample", args.semantic, "--segmentation", files[f"map_{h}x{w}"], "--num", 3 if w < 256 else 2,
                "--out", out / f"semantic_{h}x{w}.png", q)
        run("eval", args.semantic, "--metrics", "miou", "--num", args.num,
            "--size", ",".join(f"{h}x{w}" for h, w in SIZES), "--out", evals / "eval_semantic.json", q)
    if args.layout:
        run("sample", args.layout, "--layout", files["layouts"], "--num", 12, "--out", out / "layout.png", q)
        run("sample", args.layout, "--layout", files["layout_wide"], "--num", 2, "--size", "64x128",
            "--out", out / "layout_64x128.png", q)
        run("eval", args.layout, "--metrics", "layout", "--num", args.layout_num or args.num,
            "--out", evals / "eval_layout.json", q)
    if args.text:
        prompt = "a red circle at the top left and a blue square in the centre"
        for size in ("32x32", "64x128"):
            run("sample", args.text, "--prompt", prompt, "--num", 3, "--size", size, "--out",
                out / f"text_{size}.png", q)
    if args.class_model:
        for size in ("32x32", "64x128"):
            run("sample", args.class_model, "--class", 4, "--num", 3, "--size", size, "--out",
                out / f"class_{size}.png", q)
    return 0


if __name__ == "__main__":
    sys.exit(main())
