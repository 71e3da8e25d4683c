"""What a first stage lets a spatial latent model reach: its reconstructions of held-out shapes scenes, read back.

    .venv/bin/python benchmarks/first_stage_ceilings.py AE [AE ...] [--num 200] [--num-large 40]

For each autoencoder (a run folder or a model folder), on the shapes world's test split:

- PSNR and the mIoU of the segmentation read back (eval/shapes_readback.py) from the reconstructions D(E(x)) of
  held-out maps at 32x32 (``--num`` scenes) and at 64x128 and 128x256 (``--num-large`` canvases, each a grid of
  held-out 32x32 scenes, as `latentdiff eval --metrics miou` builds them): the ceiling of a semantic synthesis
  model on this first stage at each size; a first stage that is not local (global attention, image-wide norm
  statistics) loses it on the larger canvases;
- the share of reconstructed 2- and 3-object scenes that pass their own layouts (the rule of `latentdiff eval
  --metrics layout`): the ceiling of a layout model on it.

The real images themselves read back at mIoU >= 0.985 at every size and pass 99% of their layouts, so what is
lost here is the first stage's. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from latentdiff.data.shapes import ShapesConfig, ShapesDataset
from latentdiff.eval.shapes_readback import read_back
from latentdiff.eval.spatial_scores import heldout_maps, layout_scores, segmentation_iou
from latentdiff.first_stage import load_first_stage, reconstruct
from latentdiff.layouts import heldout_layouts

SIZES = ((32, 32), (64, 128), (128, 256))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))  # images in [-1, 1]: peak-to-peak 2


@torch.no_grad()
def ceilings(ae, config: ShapesConfig, num: int, num_large: int) -> dict:
    out = {}
    for h, w in SIZES:
        images, maps = heldout_maps(num if (h, w) == (32, 32) else num_large, (h, w), 32, config)
        recon = reconstruct(ae, images, batch_size=16)
        out[f"{h}x{w}"] = {"psnr": psnr(recon, images),
                           "miou": segmentation_iou(read_back(recon, config)[0], maps, config.num_classes)["miou"]}
    layouts = heldout_layouts(num, seed=0, min_objects=2, max_objects=3, config=config)
    data = ShapesDataset("test", 10 * num + 100, seed=0, config=config, size=32, min_objects=2, max_objects=3)
    real = torch.stack([data[i]["image"] for i in range(num)])  # the scenes of those layouts
    out["layout"] = layout_scores(layouts, read_back(reconstruct(ae, real, batch_size=16), config)[1])["overall"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("autoencoders", nargs="+", help="autoencoder run or model folders")
    p.add_argument("--num", type=int, default=200, help="32x32 scenes (and layouts) scored")
    p.add_argument("--num-large", type=int, default=40, help="canvases scored at 64x128 and at 128x256")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ShapesConfig()
    sizes = [f"{h}x{w}" for h, w in SIZES]
    print("| first stage | PSNR dB " + " / ".join(sizes) + " | read-back mIoU " + " / ".join(sizes)
          + " | layouts passed (2-3 objects) | s |")
    print("| --- | --- | --- | --- | --- |")
    for path in args.autoencoders:
        t0 = time.perf_counter()
        ae = load_first_stage(path)[0].eval()
        r = ceilings(ae, config, args.num, args.num_large)
        lay = r["layout"]
        print(f"| {path} | " + " / ".join(f"{r[s]['psnr']:.1f}" for s in sizes) + " | "
              + " / ".join(f"{r[s]['miou']:.3f}" for s in sizes)
              + f" | {lay['adherence']:.3f} ({lay['passed']}/{lay['count']}) | {time.perf_counter() - t0:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
