"""`latentdiff sample --layout FILE` / `--segmentation MAP.png`: the spatial inputs of a layout or semantic model,
checked before sampling, and the samples written beside a picture of each input."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import RequestError
from .sample_options import check_size


def spatial_inputs(args, pipe, s) -> tuple[dict, object]:
    """``pipe.sample`` keywords from --layout / --segmentation (``layouts`` or ``conditions``), and a picture of
    each input for the grid (a (N_inputs, 3, H, W) tensor in [-1, 1]); ({}, None) for other models. Every check
    runs here, before sampling, so that a bad input writes nothing."""
    from .layouts import draw_layout, read_layout_file, shapes_config
    from .segmaps import colourize, read_map

    given = {"--layout": args.layout, "--segmentation": args.segmentation}
    wanted = "--layout" if pipe.takes_layouts else ("--segmentation" if "segmentation" in pipe.condition_fields
                                                    else None)
    for flag, value in given.items():
        if value is not None and flag != wanted:
            raise RequestError(f"{flag} is for {flag[2:]} models; this model takes "
                           + (f"{wanted}" if wanted else "no layout or segmentation map"))
    if wanted is None:
        return {}, None
    if given[wanted] is None:
        raise RequestError(f"this model is conditioned on {wanted[2:]}s: give {wanted} FILE")
    config = shapes_config(pipe.config.data)
    if wanted == "--layout":
        layouts = read_layout_file(args.layout, config, pipe.max_objects)
        h, w = s.size or pipe.image_shape[1:]
        return {"layouts": layouts}, torch.stack([draw_layout(lay, h, w, config) for lay in layouts])
    seg = read_map(args.segmentation, config)
    if s.size is not None and tuple(s.size) != tuple(seg.shape[-2:]):
        raise RequestError(f"--size {s.size[0]}x{s.size[1]} differs from the map's {seg.shape[1]}x{seg.shape[2]}: the "
                       "image size follows the map (leave --size out)")
    pipe.spatial.make({"segmentation": seg})  # class ids in range (a RequestError naming them)
    check_size(pipe, tuple(seg.shape[-2:]))  # a size the downsampling divides
    return {"conditions": {"segmentation": seg}}, colourize(seg, config)


def write_spatial_samples(images, pictures, out: Path, pipe, s, spatial: dict, params) -> None:
    """Inputs beside outputs: a grid with one row per input (its picture, then the images drawn from it), or a
    folder of images with the inputs (``input_map.png``, a palette PNG that --segmentation reads back, or
    ``layouts.json``); a map sampled into a grid is also written beside it as ``<grid>.map.png``. ``params(i)``
    gives the generation parameters of image i (None: the grid), written into its PNG."""
    import json

    from PIL import Image

    from .fileio import atomic_write_text
    from .layouts import shapes_config, to_objects
    from .pipeline import to_pil
    from .pngmeta import save_png
    from .segmaps import write_map
    from .train.logging import make_grid

    config = shapes_config(pipe.config.data)
    k = len(pictures)
    if out.suffix.lower() == ".png":
        per_row = -(-len(images) // k)
        rows = []
        for r in range(k):
            own = images[r::k]
            blank = torch.ones(per_row - len(own), *images.shape[1:])
            rows.append(torch.cat([pictures[r : r + 1], own, blank]))
        grid = make_grid(torch.cat(rows), nrow=per_row + 1)
        save_png(Image.fromarray(grid), out, params(None))
        extra = ""
        if "conditions" in spatial:
            written = write_map(out.with_suffix(".map.png"), spatial["conditions"]["segmentation"][0], config)
            extra = f" and its map to {written}"
        print(f"wrote a grid of {len(images)} images (each row: the input, then its samples) to {out}{extra}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        save_png(im, out / f"{i:05d}_seed{s.seed + i}.png", params(i))
    if "conditions" in spatial:
        write_map(out / "input_map.png", spatial["conditions"]["segmentation"][0], config)
    else:
        layouts = [to_objects(lay, config) for lay in spatial["layouts"]]
        atomic_write_text(out / "layouts.json", json.dumps(layouts, indent=1) + "\n")
    print(f"wrote {len(images)} images and their input to {out}/")
