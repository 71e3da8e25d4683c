"""`latentdiff sample` with image inputs: super-resolution (--image low.png), inpainting (--image img.png --mask
mask.png, white = fill) and image-to-image (--init-image img.png --strength 0.6) for any model.

    latentdiff sample runs/shapes_sr4 --image low.png --out high.png            # or --image folder/ --out out/
    latentdiff sample runs/shapes_inpaint --image img.png --mask mask.png --prompt "a red circle at the top left"
    latentdiff sample runs/shapes_ldm_txt2img --init-image img.png --strength 0.6 --prompt "..."

Every input is checked (files, channels, sizes, the model's conditioning, the strength) before the model samples,
and nothing is written before all images are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MissingFileError, RequestError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_image_args(args) -> None:
    """The checks that need no model: strength in (0, 1] with --init-image, --mask with --image."""
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise RequestError(f"--strength must lie in (0, 1] (the share of the sampling steps run from the image), "
                           f"got {args.strength}")
    if args.strength is not None and args.init_image is None:
        raise RequestError("--strength is for image-to-image: give --init-image too")
    if args.init_image is not None and args.strength is None:
        args.strength = 0.6
    if args.mask is not None and args.image is None:
        raise RequestError("--mask goes with --image (the image to inpaint)")


def image_files(path: str, what: str) -> list[Path]:
    """``path`` itself, or the images of folder ``path`` in name order."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        if not files:
            raise MissingFileError(f"{what} {p} is a folder with no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    return [p]


def read_image(path: Path, channels: int) -> torch.Tensor:
    """(1, channels, H, W) in [-1, 1] from an image file (greyscale <-> RGB converted; alpha onto white)."""
    from PIL import Image, UnidentifiedImageError

    from .data.transforms import convert_channels, to_tensor

    try:
        with Image.open(path) as img:
            img.load()
            img = convert_channels(img, channels)
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"{path}: not a readable image ({e})") from None
    return to_tensor(img)[None]


def read_mask(path: Path, size: tuple[int, int], image: Path) -> torch.Tensor:
    """(1, 1, H, W) in {0, 1} from a single-channel mask file (white = fill), the size of ``image``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, got = img.mode, (img.height, img.width)
            if mode not in ("1", "L", "I", "I;16", "P") or (mode == "P" and len(img.getcolors(1 << 16) or []) > 2):
                raise RequestError(f"mask {path} is {mode} ({len(img.getbands())} channels); a mask is "
                                   "single-channel (L or 1): white = fill, black = keep")
            arr = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"{path}: not a readable image ({e})") from None
    if got != tuple(size):
        raise RequestError(f"mask {path} is {got[0]}x{got[1]} but the image {image} is {size[0]}x{size[1]}; "
                           "they must be the same size")
    return (arr >= 0.5).float()[None, None]


@dataclass
class ImageInputs:
    """The image inputs of one `latentdiff sample` call: the keyword arguments of ``Pipeline.sample`` and what the
    output grid shows beside each result."""

    names: list[str]                     # one stem per input image
    num: int                             # images drawn (inputs x per-input count)
    per_input: int
    kwargs: dict = field(default_factory=dict)  # conditions=..., init_image=..., strength=...
    shown: torch.Tensor | None = None    # (inputs, C, H, W): each input as shown left of its results
    tiled: bool = False                  # super-resolution in overlapping tiles (tiling.py)

    def sample(self, pipe, s, progress: bool) -> torch.Tensor:
        """The results, (num, C, H, W): ``Pipeline.sample`` with the image inputs, or tile by tile."""
        common = dict(sampler=s.sampler, steps=s.steps, guidance=s.guidance, eta=s.eta, batch_size=s.batch_size)
        if not self.tiled:
            return pipe.sample(s.num, prompts=s.prompts, negative_prompt=s.negative_prompt, labels=s.labels,
                               seed=s.seed, size=s.size, output="tensor", progress=progress, **common, **self.kwargs)
        from .tiling import upscale_tiled

        low = self.kwargs["conditions"]["low_res"]  # (num, C, h, w): each input repeated per_input times
        return torch.cat([upscale_tiled(pipe, low[i : i + 1], seed=s.seed + 1000 * i, **common)
                          for i in range(len(low))])

    def write(self, images: torch.Tensor, out: Path, params) -> None:
        """One PNG per result into folder ``out`` (named after the input), or ``out``.png: the result itself for
        one image, else a grid with one row per input (the input, then its results)."""
        from PIL import Image

        from .pipeline import to_pil
        from .pngmeta import save_png
        from .train.logging import make_grid

        if out.suffix.lower() == ".png":
            out.parent.mkdir(parents=True, exist_ok=True)
            if len(images) == 1:
                save_png(to_pil(images)[0], out, params(0))
                print(f"wrote {out}")
                return
            rows = []
            for i in range(len(self.names)):
                rows.append(self.shown[i : i + 1])
                rows.append(images[i * self.per_input : (i + 1) * self.per_input])
            grid = make_grid(torch.cat(rows), nrow=self.per_input + 1)
            save_png(Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid), out, params(None))
            print(f"wrote a grid of {len(self.names)} input(s), each followed by {self.per_input} result(s), to {out}")
            return
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(to_pil(images)):
            name = self.names[i // self.per_input] + ("" if self.per_input == 1 else f"_{i % self.per_input}")
            save_png(im, out / f"{name}.png", params(i))
        print(f"wrote {len(images)} images to {out}/")


def image_inputs(args, pipe) -> ImageInputs | None:
    """The checked image inputs of ``args`` for ``pipe``, or None when the command has none."""
    if args.image is None and args.init_image is None:
        return None
    spatial = pipe.spatial.name if pipe.spatial is not None else None
    channels = pipe.config.data.channels
    per_input = args.num or 1
    names, kwargs, shown = [], {}, None
    if args.image is not None:
        if spatial not in ("low_res", "inpaint"):
            what = f"conditioned on {spatial}" if spatial else f"conditioned on {pipe.conditioning or 'nothing'}"
            raise RequestError(f"--image is for super-resolution and inpainting models; {args.model} is not "
                               f"conditioned on an image ({what}); use --init-image for image-to-image")
        if spatial == "low_res" and args.mask is not None:
            raise RequestError(f"--mask is for inpainting models; {args.model} is a super-resolution model")
        if spatial == "inpaint" and args.mask is None:
            raise RequestError(f"{args.model} is an inpainting model: give --mask (white = fill) with --image")
        files = image_files(args.image, "--image")
        images = [read_image(f, channels) for f in files]
        names = [f.stem for f in files]
        sizes = {tuple(x.shape[-2:]) for x in images}
        if len(sizes) > 1:
            raise RequestError(f"--image {args.image}: the images differ in size ({sorted(sizes)}); give one size")
        size = sizes.pop()
        x = torch.cat(images)
        if args.tile and spatial != "low_res":
            raise RequestError(f"--tile is for super-resolution models; {args.model} is an inpainting model")
        if spatial == "low_res" and args.tile:
            tile = pipe.config.data.size // pipe.spatial.factor
            if min(size) < tile:
                raise RequestError(f"--tile: --image {files[0]} is {size[0]}x{size[1]}, smaller than one tile "
                                   f"({tile}x{tile}, the training size); leave out --tile")
        elif spatial == "low_res":
            _check_low_res(pipe, size, files[0])
        if spatial == "low_res":
            kwargs["conditions"] = {"low_res": x.repeat_interleave(per_input, 0)}
            factor = pipe.spatial.factor
            shown = torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")
        else:
            _check_divisible(pipe, size, f"--image {files[0]}")
            mask = read_mask(Path(args.mask), size, files[0])
            kwargs["conditions"] = {"image": x.repeat_interleave(per_input, 0), "mask": mask}
            shown = x * (1 - mask) + mask  # the fill region white
    if args.init_image is not None:
        files = image_files(args.init_image, "--init-image")
        init = torch.cat([read_image(f, channels) for f in files])
        if names and len(files) not in (1, len(names)):
            raise RequestError(f"--init-image gives {len(files)} images for {len(names)} --image inputs")
        if not names:
            names = [f.stem for f in files]
            shown = init
        _check_divisible(pipe, tuple(init.shape[-2:]), f"--init-image {files[0]}")
        kwargs.update(init_image=init.repeat_interleave(per_input, 0) if len(init) > 1 else init,
                      strength=args.strength)
    if args.tile and (args.image is None or args.init_image is not None):
        raise RequestError("--tile goes with --image on a super-resolution model (and without --init-image)")
    return ImageInputs(names, len(names) * per_input, per_input, kwargs, shown, tiled=bool(args.tile))


def _check_divisible(pipe, size: tuple[int, int], what: str) -> None:
    f = pipe.downsampling_factor
    if size[0] % f or size[1] % f:
        raise RequestError(f"{what} is {size[0]}x{size[1]}; this model takes sides that are multiples of {f}")


def _check_low_res(pipe, size: tuple[int, int], path: Path) -> None:
    """A low-resolution input this model can upscale: its sides times the factor are multiples of the model's
    downsampling (larger inputs than the training size are sampled convolutionally)."""
    factor, f = pipe.spatial.factor, pipe.downsampling_factor
    if (size[0] * factor) % f or (size[1] * factor) % f:
        step = f // math.gcd(f, factor)
        raise RequestError(f"--image {path} is {size[0]}x{size[1]}; this model upscales x{factor} to sides that "
                           f"must be multiples of {f}, so low-resolution sides must be multiples of {step} "
                           f"(trained on {pipe.config.data.size // factor}x{pipe.config.data.size // factor})")
