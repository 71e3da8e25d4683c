"""Super-resolution and inpainting scored on held-out shapes, each beside its baseline, in markdown tables.

    python benchmarks/image_tasks.py sr MODEL [--num 512] [--steps 20] [--out DIR]
    python benchmarks/image_tasks.py inpaint MODEL --baseline TXT2IMG [--num 256] [--removal 128] [--jumps 0,4]
    python benchmarks/image_tasks.py img2img MODEL [--num 128] [--strengths 0.2,0.4,0.6,0.8,1.0]

``sr``: held-out test scenes (the model's shapes world), box-filtered down by the model's factor; the model's
outputs and bicubic upsampling scored against the truth: PSNR, SSIM, FID on the shapes oracle's features; the
first stage's reconstructions D(E(x)) of the truth give the ceiling a latent model can reach.

``inpaint``: held-out test scenes with random masks (boxes and brush strokes, 10-60 %, data/masks.py); the trained
model (its caption: the scene's) beside masked sampling with RePaint resampling on the text-to-image model
``--baseline`` (the known region pasted in latent space at every step; ``--jumps`` resampling rounds per step).
Both are composited with the known pixels. Scored: FID of the composites (oracle features), PSNR of the filled
region, the seam error (RMSE, 8-bit levels, of the fill pixels next to the mask border); object removal (one
object's box masked, the caption of the others given): the share of scenes where the oracle reads the removed
object's cell empty; and seconds per sample and peak memory of one batch, each arm in its own process.

``img2img``: SDEdit from held-out scenes (with their own captions for a text model): the PSNR of the result to
the start image and the share of results in which the shapes oracle reads the start scene back, per strength.

Writes ``DIR/<task>.md`` (the table), ``.json`` (every figure) and the grids ``DIR/<task>_grid.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def held_out(pipe, num: int, seed: int, **extra):
    """``num`` test-split scenes of the model's shapes world (or crops of its test photos): (images, dataset)."""
    from latentdiff.data.shapes import ShapesDataset

    if pipe.config.data.name == "photos":
        from latentdiff.data.photos import Photos

        ds = Photos(extra.get("size", pipe.config.data.size), "test", length=num, seed=seed)
        return torch.stack([ds[i]["image"] for i in range(num)]), ds

    options = {k: v for k, v in pipe.config.data.options.items() if k != "length"}
    options.update(extra)
    options.setdefault("size", pipe.config.data.size)
    ds = ShapesDataset("test", num, seed=seed, **options)
    return torch.stack([ds[i]["image"] for i in range(num)]), ds


def mosaic(pipe, num: int, seed: int, size: int | None) -> torch.Tensor:
    """``num`` held-out images of side ``size`` (None: the training size), each a k x k mosaic of held-out scenes of
    the training size, so that objects keep the scale the model was trained on (a shapes scene rendered larger has
    larger objects)."""
    side = pipe.config.data.size
    k = 1 if size is None else size // side
    if k * side != (size or side):
        raise SystemExit(f"--size must be a multiple of the training size {side}")
    x, _ = held_out(pipe, num * k * k, seed)
    x = x.view(num, k, k, *x.shape[1:])  # (N, k, k, C, s, s)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(num, x.shape[3], k * side, k * side)


def oracle_features(oracle, images: torch.Tensor):
    from latentdiff.eval.features import quantize_8bit

    with torch.no_grad():
        return torch.cat([oracle.features(quantize_8bit(x)) for x in images.split(256)]).numpy()


def reconstruct(pipe, x: torch.Tensor) -> torch.Tensor:
    """D(E(x)) with the posterior mean: what a latent model can reach at best."""
    if pipe.autoencoder is None:
        return x
    with torch.no_grad():
        return pipe.autoencoder.decode(pipe.autoencoder.encode(x, sample=False)).clamp(-1, 1)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ---- super-resolution --------------------------------------------------------------------------------------------


def run_sr(args) -> dict:
    import latentdiff
    from latentdiff.eval.feature_networks import shapes_oracle_cached
    from latentdiff.eval.metrics import fid, psnr, ssim
    from latentdiff.spatial_image import downsample
    from latentdiff.train.logging import save_grid

    pipe = latentdiff.load(args.model)
    factor = pipe.spatial.factor
    truth, other = mosaic(pipe, args.num, args.seed, args.size), mosaic(pipe, args.num, args.seed + 1, args.size)
    low = downsample(truth, factor)
    bicubic = F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
    t0 = time.perf_counter()
    if args.tile:  # each image in overlapping tiles of the training size (tiling.py)
        from latentdiff.tiling import upscale_tiled

        out = torch.cat([upscale_tiled(pipe, low[i : i + 1], steps=args.steps, seed=args.seed + 1000 * i)
                         for i in range(args.num)])
    else:
        out = pipe.sample(args.num, conditions={"low_res": low}, steps=args.steps, seed=args.seed, output="tensor")
    seconds = time.perf_counter() - t0
    shapes = pipe.config.data.name == "shapes"  # FID on the shapes oracle's features; none for photos (no
    oracle = shapes_oracle_cached(verbose=False) if shapes else None  # oracle, no local Inception weights)
    f_truth = oracle_features(oracle, truth) if shapes else None
    rows, result = [], {"num": args.num, "steps": args.steps, "sampler": pipe.config.sample.sampler}
    how = ", tiled" if args.tile else (", whole" if args.size else "")
    arms = [("bicubic", bicubic), (f"model ({pipe.config.sample.sampler}, {args.steps} steps{how})", out)]
    if pipe.autoencoder is not None:
        arms.append(("first-stage ceiling D(E(x))", reconstruct(pipe, truth)))
    arms.append(("other real scenes (unpaired)", other))
    for name, x in arms:
        r = {"fid": fid(oracle_features(oracle, x), f_truth)} if shapes else {}
        if not name.startswith("other"):
            r.update(psnr=float(psnr(x, truth).mean()), ssim=float(ssim(x, truth).mean()))
        elif not shapes:
            continue
        result[name] = r
        rows.append([name, f"{r['psnr']:.2f}" if "psnr" in r else "-", f"{r['ssim']:.4f}" if "ssim" in r else "-",
                     f"{r['fid']:.1f}" if "fid" in r else "-"])
    result["seconds_per_image"] = seconds / args.num
    h, w = truth.shape[-2:]
    head = f"{h // factor}x{w // factor} -> {h}x{w}, {args.num} held-out scenes"
    table = _table([head, "PSNR (dB)", "SSIM", "FID (oracle)"], rows)
    ms = seconds / args.num * 1000
    table += f"\n\nmodel: {ms:.1f} ms per image on this CPU (batch {pipe.config.sample.batch_size})"
    n = 8
    shown = F.interpolate(low[:n], scale_factor=factor, mode="nearest")
    grid = torch.stack([shown, bicubic[:n], out[:n], truth[:n]], 1).flatten(0, 1)  # rows: low, bicubic, model, truth
    tag = (f"_{args.size}" if args.size else "") + ("_tiled" if args.tile else "")
    save_grid(grid, args.out / f"sr{tag}_grid.png", nrow=4)
    return {"table": table, "result": result}


# ---- inpainting --------------------------------------------------------------------------------------------------


def removal_cases(pipe, num: int, seed: int):
    """Scenes with 2-3 objects, one of them masked by its pixel box grown by a pixel: (images, masks, prompts of
    the other objects, the removed object's cell)."""
    from latentdiff.data.shapes import Scene, caption, pixel_box

    images, ds = held_out(pipe, num, seed, min_objects=2)
    size = pipe.config.data.size
    masks, prompts, cells = torch.zeros(num, 1, size, size), [], []
    g = torch.Generator().manual_seed(seed)
    for i in range(num):
        scene = ds.scene(i)
        k = int(torch.randint(len(scene.objects), (1,), generator=g))
        c0, r0, c1, r1 = pixel_box(scene.objects[k].box(), size)
        masks[i, :, max(r0 - 1, 0) : r1 + 1, max(c0 - 1, 0) : c1 + 1] = 1
        rest = tuple(o for j, o in enumerate(scene.objects) if j != k)
        prompts.append(caption(Scene(rest, scene.background)))
        cells.append(scene.objects[k].cell)
    return images, masks, prompts, torch.tensor(cells)


def fill(pipe, images, masks, prompts, *, steps, seed, guidance, jumps=None, batch=64) -> torch.Tensor:
    """Composited fills: the trained inpainting model (``jumps`` None), or RePaint masked sampling on a text model
    (the known latent cells pasted; a cell is known when none of its pixels is to be filled)."""
    out = []
    f = pipe.downsampling_factor // pipe.unet.config.downsampling_factor  # the first stage's f
    for start in range(0, len(images), batch):
        x, m = images[start : start + batch], masks[start : start + batch]
        p = prompts[start : start + batch] if pipe.takes_prompts else None
        if jumps is None:
            y = pipe.sample(len(x), prompts=p, conditions={"image": x, "mask": m}, steps=steps, seed=seed + start,
                            guidance=guidance, output="tensor", batch_size=batch)
        else:
            gen = torch.Generator().manual_seed(seed + start)
            known = pipe.encode(x, generator=gen)
            keep = 1 - F.max_pool2d(m, f) if f > 1 else 1 - m
            y = pipe.sample(len(x), prompts=p, mask=keep, known=known, resample_jumps=jumps, sampler="ddim",
                            steps=steps, seed=seed + start, guidance=guidance, output="tensor", batch_size=batch)
        out.append(m * y + (1 - m) * x)
    return torch.cat(out)


def region_psnr(x, truth, masks) -> float:
    """Mean over images of the PSNR of the masked (filled) pixels, data range 2 ([-1, 1])."""
    err = ((x - truth) ** 2 * masks).sum((1, 2, 3)) / (masks.sum((1, 2, 3)) * x.shape[1]).clamp(min=1)
    return float((10 * torch.log10(4.0 / err.clamp(min=1e-10))).mean())


def seam_error(x, truth, masks) -> float:
    """RMSE in 8-bit levels of the fill pixels that touch a known pixel (the inner ring of the mask border)."""
    known = 1 - masks
    ring = masks * F.max_pool2d(known, 3, stride=1, padding=1)  # fill pixels with a known 8-neighbour
    err = ((x - truth) * 127.5) ** 2 * ring
    return float((err.sum() / (ring.sum() * x.shape[1]).clamp(min=1)).sqrt())


def _timed(queue, model, steps, guidance, jumps, seed):
    """One batch of 64 in a fresh process: (seconds per sample, peak resident memory in MiB)."""
    import latentdiff
    from latentdiff.data.masks import random_masks

    torch.set_num_threads(1)
    pipe = latentdiff.load(model)
    x, _ = held_out(pipe, 64, seed)
    m = random_masks(64, x.shape[-2:], generator=torch.Generator().manual_seed(seed), full_fraction=0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fill(pipe, x, m, [""] * 64, steps=steps, seed=seed, guidance=guidance, jumps=jumps)
    seconds = (time.perf_counter() - t0) / 64
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before / 1024))


def timed(model, steps, guidance, jumps, seed) -> tuple[float, float, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_timed, args=(q, str(model), steps, guidance, jumps, seed))
    p.start()
    r = q.get()
    p.join()
    return r


def run_inpaint(args) -> dict:
    import latentdiff
    from latentdiff.data.masks import random_masks
    from latentdiff.eval.adherence import read_cells
    from latentdiff.eval.feature_networks import shapes_oracle_cached
    from latentdiff.eval.metrics import fid
    from latentdiff.train.logging import save_grid

    pipe, base = latentdiff.load(args.model), latentdiff.load(args.baseline)
    truth, ds = held_out(pipe, args.num, args.seed)
    prompts = [ds.caption(i) for i in range(args.num)]
    masks = random_masks(args.num, truth.shape[-2:], generator=torch.Generator().manual_seed(args.seed),
                         full_fraction=0.0)
    other, _ = held_out(pipe, args.num, args.seed + 1)
    rimages, rmasks, rprompts, rcells = removal_cases(pipe, args.removal, args.seed + 2)
    oracle = shapes_oracle_cached(verbose=False)
    f_truth = oracle_features(oracle, truth)
    g = args.guidance if args.guidance is not None else pipe.config.sample.guidance
    arms = [("trained inpainting model", args.model, None)] + [
        (f"RePaint on the text-to-image model, {j} jump(s)", args.baseline, j) for j in args.jumps]
    rows, result, grids = [], {"num": args.num, "removal_scenes": args.removal, "steps": args.steps, "guidance": g}, []
    for name, folder, jumps in arms:
        model = pipe if jumps is None else base
        t0 = time.perf_counter()
        x = fill(model, truth, masks, prompts, steps=args.steps, seed=args.seed, guidance=g, jumps=jumps)
        wall = time.perf_counter() - t0
        removed = fill(model, rimages, rmasks, rprompts, steps=args.steps, seed=args.seed, guidance=g, jumps=jumps)
        read = read_cells(oracle, removed)
        gone = float((read[torch.arange(len(rcells)), rcells] == 0).float().mean())
        sps, peak, before = timed(folder, args.steps, g, jumps, args.seed)
        nfe = args.steps * (1 + (jumps or 0)) * (2 if g != 1 else 1)
        r = {"fid": fid(oracle_features(oracle, x), f_truth), "psnr_fill": region_psnr(x, truth, masks),
             "seam_rmse": seam_error(x, truth, masks), "removal": gone, "seconds_per_sample": sps,
             "peak_rss_mib": peak, "rss_after_load_mib": before, "network_evals": nfe, "wall_s_eval": wall}
        result[name] = r
        rows.append([name, f"{r['fid']:.1f}", f"{r['psnr_fill']:.2f}", f"{r['seam_rmse']:.1f}", f"{gone:.1%}",
                     nfe, f"{1 / sps:.1f}", f"{peak:.0f}"])
        grids.append((x[:8], removed[:8]))
    floor = {"fid": fid(oracle_features(oracle, other), f_truth),
             "removal": float((read_cells(oracle, rimages)[torch.arange(len(rcells)), rcells] == 0).float().mean())}
    result["real (floor; removal: no edit)"] = floor
    rows.append(["other real images / unedited scenes", f"{floor['fid']:.1f}", "-", "-", f"{floor['removal']:.1%}",
                 "-", "-", "-"])
    table = _table([f"{args.num} held-out scenes, random masks 10-60 %", "FID (oracle)", "PSNR fill (dB)",
                    "seam RMSE (8-bit)", f"removal ({args.removal} scenes)", "network evals", "samples/s (1 thread)",
                    "peak RSS (MiB)"], rows)
    shown = truth[:8] * (1 - masks[:8]) + masks[:8]
    rshown = rimages[:8] * (1 - rmasks[:8]) + rmasks[:8]
    save_grid(torch.stack([shown, grids[0][0], grids[1][0], truth[:8]], 1).flatten(0, 1),
              args.out / "inpaint_grid.png", nrow=4)
    save_grid(torch.stack([rshown, grids[0][1], grids[1][1], rimages[:8]], 1).flatten(0, 1),
              args.out / "removal_grid.png", nrow=4)
    return {"table": table, "result": result}


# ---- image-to-image ----------------------------------------------------------------------------------------------


def run_img2img(args) -> dict:
    """SDEdit at several strengths: how far the result moves from the start image (PSNR to it) and, for a text
    model of the shapes world, how often the oracle reads the start image's own caption back (adherence)."""
    import latentdiff
    from latentdiff.eval.adherence import read_cells
    from latentdiff.eval.feature_networks import shapes_oracle_cached
    from latentdiff.eval.metrics import psnr

    pipe = latentdiff.load(args.model)
    x, ds = held_out(pipe, args.num, args.seed)
    prompts = [ds.caption(i) for i in range(args.num)] if pipe.takes_prompts else None
    cells = torch.stack([ds[i]["cells"] for i in range(args.num)])
    oracle = shapes_oracle_cached(verbose=False)
    rows, result = [], {"num": args.num, "steps": args.steps}
    if pipe.autoencoder is not None:  # strength -> 0 leaves D(E(x)): the first stage's own ceiling
        rec = reconstruct(pipe, x)
        same = float((read_cells(oracle, rec) == cells).all(1).float().mean())
        result["first stage D(E(x))"] = {"psnr_to_start": float(psnr(rec, x).mean()), "scene_kept": same}
        rows.append(["0 (D(E(x)), the first stage alone)", f"{float(psnr(rec, x).mean()):.2f}", f"{same:.1%}", "-"])
    for strength in args.strengths:
        t0 = time.perf_counter()
        y = pipe.sample(args.num, prompts=prompts, init_image=x, strength=strength, steps=args.steps,
                        seed=args.seed, output="tensor")
        sec = (time.perf_counter() - t0) / args.num
        same = float((read_cells(oracle, y) == cells).all(1).float().mean())
        r = {"psnr_to_start": float(psnr(y, x).mean()), "scene_kept": same, "seconds_per_image": sec}
        result[str(strength)] = r
        rows.append([strength, f"{r['psnr_to_start']:.2f}", f"{same:.1%}", f"{sec * 1000:.0f}"])
    table = _table(["strength", "PSNR to the start image (dB)", "oracle reads the start scene", "ms per image"],
                   rows)
    return {"table": table, "result": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["sr", "inpaint", "img2img"])
    p.add_argument("model", type=Path)
    p.add_argument("--baseline", type=Path, default=None, help="inpaint: the text-to-image model for RePaint")
    p.add_argument("--num", type=int, default=None, help="held-out scenes (default: sr 512, inpaint 256)")
    p.add_argument("--removal", type=int, default=128, help="inpaint: object-removal scenes")
    p.add_argument("--jumps", default="0,4", help="inpaint: RePaint resampling rounds per step, one arm each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="inpaint: guidance of both arms (default: model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", action="store_true", help="sr: upscale in overlapping tiles of the training size "
                   "(default: the whole image at once, convolutionally)")
    p.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0", help="img2img: the strengths, one row each")
    p.add_argument("--size", type=int, default=None, help="sr: the side of the truth images, a multiple of the "
                   "training size: mosaics of held-out scenes (default: the training size); the oracle scores a resize")
    p.add_argument("--out", type=Path, default=None, help="folder of the table, JSON and grids (default MODEL/eval)")
    args = p.parse_args(argv)
    args.num = args.num or {"sr": 512, "inpaint": 256, "img2img": 128}[args.task]
    args.strengths = [float(v) for v in args.strengths.split(",")]
    args.jumps = [int(v) for v in args.jumps.split(",")]
    args.out = args.out or args.model / "eval"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.task == "inpaint" and args.baseline is None:
        p.error("inpaint needs --baseline (a text-to-image model of the same first stage)")
    t0 = time.perf_counter()
    report = {"sr": run_sr, "inpaint": run_inpaint, "img2img": run_img2img}[args.task](args)
    report["result"]["wall_s"] = time.perf_counter() - t0
    name = args.task + (f"_{args.size}" if args.size else "") + ("_tiled" if args.tile else "")
    (args.out / f"{name}.md").write_text(report["table"] + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(report["result"], indent=1))
    print(report["table"])
    print(f"wrote {args.out}/{name}.md, .json and the grid(s) ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
