"""Scores of the spatial tasks: semantic synthesis (per-class IoU, mIoU) and layout-to-image (adherence, box IoU).

Both read the generated images back with the colour-fit reader of eval/shapes_readback.py (no network), and score
the same reader on the real images of the same inputs: the ceiling, which shows how much of a shortfall is the
reader's (at 32x32 it reads real maps back at mIoU ~0.998). For a latent model the semantic table adds the
first stage's ceiling: the real images encoded and decoded (𝒟(ℰ(x)), whole, at that size) and read back; the
latent model cannot draw sharper than its decoder.

- Semantic synthesis (LDM sec. 4.3.2): per-class IoU = |pred ∩ map| / |pred ∪ map| summed over all images, for
  each class that occurs in the maps or the read-backs; ``miou`` is their mean with the background class
  included, ``miou_objects`` without it. Inputs are held-out maps (the test split); a size larger than the
  training size is a grid of rows x cols held-out scenes side by side (objects keep their training scale), as
  LDM samples landscapes larger than its training crops.
- Layout-to-image: an image passes when the read-back finds exactly as many objects as the layout has and
  each asked object (shape, colour) is found, one to one, with its centre inside the asked box. The box IoU is
  the mean, over asked objects, of the IoU between the asked box and the box of the found object matched to it
  (0 when none is). Layouts are held-out (test split) with two or three objects.
"""

from __future__ import annotations

import torch

from ..data.shapes import ShapesConfig, ShapesDataset
from .shapes_readback import read_back


def segmentation_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """Per-class IoU over a set of (N, H, W) maps with ids 0..num_classes (0 = background), and their means."""
    inter, union = [], []
    for c in range(num_classes + 1):
        p, t = pred == c, target == c
        inter.append(int((p & t).sum()))
        union.append(int((p | t).sum()))
    per_class = {c: inter[c] / union[c] for c in range(num_classes + 1) if union[c] > 0}
    objects = [v for c, v in per_class.items() if c > 0]
    return {"per_class": per_class, "miou": sum(per_class.values()) / max(len(per_class), 1),
            "miou_objects": sum(objects) / max(len(objects), 1),
            "pixel_accuracy": float((pred == target).float().mean())}


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def layout_match(asked: torch.Tensor, found: list) -> tuple[bool, list[float]]:
    """(passes, IoU of each asked object) of one image: ``asked`` (K, 5) layout, ``found`` its ReadObjects."""
    objects = [(int(round(r[0])), r[1:]) for r in asked.tolist() if r[0] >= 0]
    free = list(range(len(found)))
    ious, matched = [], 0
    for cls, box in objects:
        best, best_iou = None, -1.0
        for j in free:
            f = found[j]
            cx, cy = f.centre()
            if f.class_id == cls and box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
                iou = box_iou(box, f.box)
                if iou > best_iou:
                    best, best_iou = j, iou
        if best is None:
            ious.append(0.0)
        else:
            free.remove(best)
            matched += 1
            ious.append(best_iou)
    return matched == len(objects) and len(found) == len(objects), ious


def placed(asked: torch.Tensor, found: list) -> list[bool]:
    """For each asked object of one image: is some found object's centre inside its box, whatever its class (a
    diagnostic of position alone)."""
    out = []
    for r in asked.tolist():
        if r[0] >= 0:
            out.append(any(r[1] <= f.centre()[0] <= r[3] and r[2] <= f.centre()[1] <= r[4] for f in found))
    return out


def layout_scores(layouts: torch.Tensor, found: list) -> dict:
    """Adherence and mean box IoU of a set of images, overall and by object count; ``placed`` is the share of asked
    objects with some object (of any class) centred in their box."""
    groups: dict[str, list] = {}
    for lay, objs in zip(layouts, found):
        ok, ious = layout_match(lay, objs)
        n = int((lay[:, 0] >= 0).sum())
        for key in (f"{n} objects", "overall"):
            groups.setdefault(key, []).append((ok, ious, placed(lay, objs)))
    out = {}
    for key, rows in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
        ious = [v for _, iou, _ in rows for v in iou]
        where = [v for _, _, p in rows for v in p]
        out[key] = {"adherence": sum(ok for ok, _, _ in rows) / len(rows), "passed": sum(ok for ok, _, _ in rows),
                    "count": len(rows), "box_iou": sum(ious) / max(len(ious), 1),
                    "placed": sum(where) / max(len(where), 1)}
    return out


def heldout_maps(num: int, size: tuple[int, int], tile: int, config: ShapesConfig, seed: int = 0):
    """(images (num, 3, H, W), maps (num, H, W)) of held-out scenes: each a grid of (H/tile) x (W/tile) test-split
    scenes of side ``tile`` (the training size)."""
    h, w = size
    if h % tile or w % tile:
        raise ValueError(f"size {h}x{w} is not a grid of {tile}x{tile} scenes (the training size)")
    rows, cols = h // tile, w // tile
    ds = ShapesDataset("test", num * rows * cols, seed=seed, config=config, size=tile)
    images, maps = torch.zeros(num, 3, h, w), torch.zeros(num, h, w, dtype=torch.long)
    for i in range(num):
        for k in range(rows * cols):
            item = ds[i * rows * cols + k]
            r, c = divmod(k, cols)
            images[i, :, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = item["image"]
            maps[i, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = item["segmentation"]
    return images, maps


def _batches(num: int, batch_size: int):
    for start in range(0, num, batch_size):
        yield start, min(batch_size, num - start)


def evaluate_semantic(pipe, *, num: int, sizes, config: ShapesConfig, seed: int = 0, batch_size: int = 16,
                      progress: bool = False, **sample_options) -> dict:
    """mIoU of ``num`` samples from held-out maps at each (H, W) of ``sizes``, with the reader's ceiling on the
    real images of the same maps."""
    tile = pipe.config.data.size
    classes = pipe.spatial.classes
    out = {}
    for size in sizes:
        images, maps = heldout_maps(num, tuple(size), tile, config, seed=seed)
        preds = []
        for start, n in _batches(num, batch_size):
            x = pipe.sample(n, conditions={"segmentation": maps[start:start + n]}, seed=seed + start,
                            batch_size=n, output="tensor", progress=progress, **sample_options)
            preds.append(read_back(x, config)[0])
        model = segmentation_iou(torch.cat(preds), maps, classes)
        real = segmentation_iou(read_back(images, config)[0], maps, classes)
        out[f"{size[0]}x{size[1]}"] = {"model": model, "real_images": real, "num": num}
        if pipe.autoencoder is not None:
            recon = torch.cat([reconstruct(pipe, images[start:start + n]) for start, n in _batches(num, batch_size)])
            out[f"{size[0]}x{size[1]}"]["first_stage"] = segmentation_iou(read_back(recon, config)[0], maps, classes)
    return out


@torch.no_grad()
def reconstruct(pipe, images: torch.Tensor) -> torch.Tensor:
    """𝒟(ℰ(x)) of a latent model's first stage (posterior mean), whole at the images' size: the ceiling of what
    the latent model can draw."""
    ae = pipe.autoencoder
    z = ae.encode(images.to(pipe.device), sample=False)
    return ae.decode(z).clamp(-1, 1).float().cpu()


def evaluate_layouts(pipe, *, num: int, config: ShapesConfig, seed: int = 0, batch_size: int = 16,
                     size=None, progress: bool = False, **sample_options) -> dict:
    """Layout adherence and box IoU of ``num`` samples from held-out 2- and 3-object layouts, of the real images
    of the same scenes (the reader's ceiling) and, for a latent model, of their first-stage reconstructions (the
    decoder's ceiling)."""
    from ..layouts import heldout_layouts

    layouts = heldout_layouts(num, seed=seed, min_objects=2, max_objects=min(3, pipe.max_objects), config=config)
    if layouts.shape[1] < pipe.max_objects:
        pad = torch.full((num, pipe.max_objects - layouts.shape[1], 5), -1.0)
        layouts = torch.cat([layouts, pad], dim=1)
    found = []
    for start, n in _batches(num, batch_size):
        x = pipe.sample(n, layouts=layouts[start:start + n], seed=seed + start, batch_size=n, size=size,
                        output="tensor", progress=progress, **sample_options)
        found += read_back(x, config)[1]
    ds = ShapesDataset("test", 10 * num + 100, seed=seed, config=config, size=pipe.config.data.size,
                       min_objects=2, max_objects=min(3, pipe.max_objects))
    real = torch.stack([ds[i]["image"] for i in range(num)])
    out = {"model": layout_scores(layouts, found), "real_images": layout_scores(layouts, read_back(real, config)[1]),
           "num": num}
    if pipe.autoencoder is not None:
        recon = torch.cat([reconstruct(pipe, real[start:start + n]) for start, n in _batches(num, batch_size)])
        out["first_stage"] = layout_scores(layouts, read_back(recon, config)[1])
    return out


def format_semantic(result: dict) -> str:
    lines = ["| size | mIoU | mIoU (objects) | pixel accuracy | real images: mIoU | first stage D(E(x)): mIoU "
             "| images |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for size, r in result.items():
        m, real = r["model"], r["real_images"]
        ceiling = f"{r['first_stage']['miou']:.3f}" if "first_stage" in r else "-"
        lines.append(f"| {size} | {m['miou']:.3f} | {m['miou_objects']:.3f} | {m['pixel_accuracy']:.3f} | "
                     f"{real['miou']:.3f} | {ceiling} | {r['num']} |")
    return "\n".join(lines)


def format_layouts(result: dict) -> str:
    lines = ["| layouts | adherence | box IoU | placed (any class) | real images: adherence | real images: box IoU "
             "| first stage D(E(x)): adherence |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, m in result["model"].items():
        real = result["real_images"][key]
        ceiling = f"{result['first_stage'][key]['adherence']:.3f}" if "first_stage" in result else "-"
        lines.append(f"| {key} ({m['count']}) | {m['adherence']:.3f} ({m['passed']}/{m['count']}) | "
                     f"{m['box_iou']:.3f} | {m['placed']:.3f} | {real['adherence']:.3f} | {real['box_iou']:.3f} "
                     f"| {ceiling} |")
    return "\n".join(lines)


def format_result(result: dict) -> str:
    """The table of a ``latentdiff eval`` result of kind layout or miou."""
    return format_semantic(result["miou"]) if result["kind"] == "miou" else format_layouts(result["layout"])
