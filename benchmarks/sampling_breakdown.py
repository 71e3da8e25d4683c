"""Sampling end to end, from x_T to PNG files, with classifier-free guidance: where the time goes.

    nice -n 19 .venv/bin/python benchmarks/sampling_breakdown.py [--num 32] [--steps 20] [--threads 1]

Models: the demo models' networks with their recipes' shapes (weights at initialisation: the time does not depend on
them): ``digits`` (digits_ddpm: class-conditional pixel U-Net, 8x8) and ``shapes_txt2img`` (shapes_ldm_txt2img: a
text encoder τ_θ, the latent U-Net, and the KL-f4 first stage of shapes_vae_txt2img decoding 3x8x8 latents to
32x32). For each, ``Pipeline.sample`` draws ``--num`` images (8 distinct prompts or classes, cycled) and each image is
written as a PNG with its generation parameters (``pngmeta.save_png``, as ``latentdiff sample`` does). Parts:

- text encoding: the conditioner's calls (prompts are encoded once each and cached: ``Pipeline.encode_prompts``);
  class models: the label lookup, inside the U-Net;
- U-Net: the network calls (one batched call of 2B per step for guidance);
- sampler overhead: the rest of ``sample`` (noise, the update rule, guidance arithmetic, batching);
- decode: the first stage's decoder (latent models);
- PNG: encoding and writing the files.

Shares are of the end-to-end time; the aim is that nothing but the U-Net and the decoder exceeds 5%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class Timer:
    """Wraps a callable and sums its wall time."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def digits_pipeline():
    from latentdiff.config import load_config
    from latentdiff.pipeline import Pipeline
    from latentdiff.recipes import find_recipe

    config = load_config(find_recipe("digits_ddpm"), ["data.channels=1"])
    return Pipeline.from_config(config), None


def shapes_pipeline(folder: Path):
    """shapes_ldm_txt2img's networks with a first stage shaped as shapes_vae_txt2img, weights at initialisation."""
    from latentdiff import first_stage
    from latentdiff.config import load_config
    from latentdiff.data import make_dataset
    from latentdiff.nn.autoencoder import save_autoencoder
    from latentdiff.nn.tokenizer import WordTokenizer
    from latentdiff.pipeline import Pipeline
    from latentdiff.recipes import find_recipe

    ae_cfg = load_config(find_recipe("shapes_vae_txt2img"), ["data.channels=3"])
    ae = first_stage.Autoencoder(first_stage.autoencoder_config(ae_cfg))
    save_autoencoder(ae, str(folder / "ae"), latent_scale=1.0)
    config = load_config(find_recipe("shapes_ldm_txt2img"), [f"latent.first_stage={folder / 'ae'}", "data.channels=3"])
    data = make_dataset(config.data)
    captions = [data.caption(i) for i in range(2000)]
    tokenizer = WordTokenizer.build(captions)
    return Pipeline.from_config(config, tokenizer=tokenizer), captions[:8]


def breakdown(pipe, prompts, *, num: int, steps: int, batch: int, guidance: float, out: Path) -> dict:
    from latentdiff.pngmeta import save_png

    warm = dict(prompts=prompts[:2]) if prompts is not None else dict(labels=[0, 1])
    pipe.sample(2, steps=2, guidance=guidance, batch_size=2, sampler="ddim", output="tensor", **warm)  # first calls
    if prompts is not None:
        pipe._prompt_cache.clear()  # the timed run encodes its prompts itself
    unet = Timer(pipe.model_fn)
    text = None
    if pipe.conditioner is not None and prompts is not None:
        text = Timer(pipe.conditioner.forward)
        pipe.conditioner.forward = text
    decode = Timer(pipe.decode)
    pipe.decode = decode
    kwargs = dict(prompts=prompts) if prompts is not None else dict(labels=list(range(8)))
    t0 = time.perf_counter()
    images = pipe.sample(num, steps=steps, guidance=guidance, batch_size=batch, sampler="ddim", output="pil",
                         model_fn=unet, **kwargs)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, im in enumerate(images):
        save_png(im, out / f"{i:05d}.png", {"seed": i, "steps": steps, "guidance": guidance})
    t_png = time.perf_counter() - t0
    parts = {"text encoding": text.seconds if text else 0.0, "U-Net": unet.seconds,
             "decode": decode.seconds if pipe.autoencoder is not None else 0.0, "PNG": t_png}
    parts["sampler overhead"] = t_sample - parts["text encoding"] - parts["U-Net"] - parts["decode"]
    total = t_sample + t_png
    return dict(parts=parts, total=total, img_s=num / total, unet_calls=unet.calls,
                text_calls=text.calls if text else 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="digits,shapes_txt2img")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            pipe, prompts = digits_pipeline() if name == "digits" else shapes_pipeline(tmp)
            (tmp / name).mkdir()
            res = breakdown(pipe, prompts, num=args.num, steps=args.steps, batch=args.batch_size,
                            guidance=args.guidance, out=tmp / name)
            results[name] = res
            print(f"{name}: {args.num} images, {args.steps} DDIM steps, guidance {args.guidance}, batch "
                  f"{args.batch_size}, {args.threads} thread(s): {res['total']:.2f} s, {res['img_s']:.2f} images/s "
                  f"end to end ({res['unet_calls']} U-Net calls, {res['text_calls']} text-encoder calls)")
            for part, sec in res["parts"].items():
                print(f"  {part:17} {sec:8.3f} s  {sec / res['total']:6.1%}")
    return results


if __name__ == "__main__":
    main()
