"""Streamed shards: samples per second read and decoded by one loader worker, against what a training step eats.

    nice -n 19 .venv/bin/python benchmarks/stream_throughput.py [--num 2048] [--size 32] [--threads 1]

Writes ``--num`` shapes images (PNG, with captions) into webdataset shards of 256, encodes them into latent shards
with a KL-f4 first stage shaped as shapes_vae_txt2img (``latentdiff encode``'s code), then times in this one run:

- image shards: ``ShardStream`` batches of 64 (tar read + PNG decode + resize + collate), one worker (the main
  process), shuffle buffer 1000;
- latent shards: the same for the .npy latents and captions;
- the resume skip: samples per second passed over (read, not decoded) when a worker resumes mid-epoch;
- the consumers: one training step of shapes_ldm_txt2img's U-Net + text encoder at batch 64 on 3x8x8 latents
  (what latent shards feed), and of the digits U-Net on 1x8x8 (a small pixel model fed by image shards).

A worker keeps up when its samples/s exceeds the step's; otherwise add ``train.num_workers``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def shapes_shards(out: Path, num: int, size: int) -> None:
    from latentdiff.data import make_dataset
    from latentdiff.data.shards import write_shards
    from latentdiff.data.transforms import to_pil

    ds = make_dataset("shapes", size=size, options={"length": num, "max_objects": 3})

    def samples():
        for i in range(num):
            item = ds[i]
            buf = io.BytesIO()
            to_pil(item["image"]).save(buf, format="PNG")
            yield f"{i:07d}", {"png": buf.getvalue(), "txt": item["caption"].encode()}

    write_shards(samples(), out, shard_size=256)


def read_rate(spec, batch: int, **kw) -> float:
    from latentdiff.data.shards import ShardStream

    stream = ShardStream(spec, shuffle_buffer=1000, **kw).configured(batch_size=batch)
    it = stream.batches(0, 1)
    n = stream.num_samples
    t0 = time.perf_counter()
    for _ in range(n // batch):
        next(it)
    return (n // batch) * batch / (time.perf_counter() - t0)


def skip_rate(spec) -> float:
    from latentdiff.data.shards import ShardStream

    stream = ShardStream(spec, shuffle_buffer=1000)
    t0 = time.perf_counter()
    n = sum(1 for _ in stream.epoch_samples(0, 0, 1))
    return n / (time.perf_counter() - t0)


def step_rate(kind: str, batch: int, steps: int = 3) -> float:
    """Samples per second of training steps (forward, backward, AdamW) of a demo model."""
    from latentdiff.nn.text_encoder import TextEncoder, TextEncoderConfig
    from latentdiff.nn.unet import UNet, UNetConfig, unet_from_preset

    torch.manual_seed(0)
    if kind == "digits":
        net, cond = unet_from_preset("digits"), None
        x, kw = torch.randn(batch, 1, 8, 8), {"y": torch.randint(0, 10, (batch,))}
    else:  # shapes_ldm_txt2img's U-Net and text encoder
        net = UNet(UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(1, 2), head_channels=32, context_dim=64, use_linear_proj=True,
                              use_scale_shift_norm=True))
        cond = TextEncoder(TextEncoderConfig(vocab_size=40, context_length=25, width=64, depth=2, heads=4))
        x, kw = torch.randn(batch, 3, 8, 8), {}
    params = list(net.parameters()) + (list(cond.parameters()) if cond is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-4)
    t = torch.randint(0, 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        extra = dict(kw)
        if cond is not None:
            extra["context"] = cond(torch.randint(0, 40, (batch, 25)))
        torch.nn.functional.mse_loss(net(x, t, **extra), x).backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=2048)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from latentdiff import first_stage
    from latentdiff.config import load_config
    from latentdiff.data.latent_shards import encode_shards
    from latentdiff.recipes import find_recipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shapes_shards(tmp / "img", args.num, args.size)
        t_write = time.perf_counter() - t0
        ae = first_stage.Autoencoder(first_stage.autoencoder_config(
            load_config(find_recipe("shapes_vae_txt2img"), ["data.channels=3"])))
        t0 = time.perf_counter()
        encode_shards(tmp / "img", ae, tmp / "lat", size=args.size, progress=False)
        t_encode = time.perf_counter() - t0
        rows = {
            "image shards: read + decode (1 worker)": read_rate(tmp / "img", args.batch, size=args.size),
            "latent shards: read + decode (1 worker)": read_rate(tmp / "lat", args.batch),
            "image shards: resume skip (read, no decode)": skip_rate(tmp / "img"),
            "latent encode (latentdiff encode, 1 process)": args.num / t_encode,
            "writing image shards (PNG encode + tar)": args.num / t_write,
            "consumer: shapes_ldm_txt2img train step": step_rate("shapes", args.batch),
            "consumer: digits train step": step_rate("digits", args.batch),
        }
    print(f"{args.num} shapes images {args.size}x{args.size}, shards of 256, batch {args.batch}, {args.threads} "
          f"thread(s)")
    for k, v in rows.items():
        print(f"  {k:48} {v:10.1f} samples/s")
    return rows


if __name__ == "__main__":
    main()
