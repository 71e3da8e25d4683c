"""What the latent cache saves per training step: encoding a batch with the first stage vs reading cached latents.

    .venv/bin/python benchmarks/latent_cache.py [--batch 64] [--pool 512] [--repeats 10] [--threads 1]

The autoencoder is the KL-f4 first stage of ``configs/shapes_vae_kl_f4.yaml`` (its ``autoencoder`` section at
32x32; random weights: the cost does not depend on them). Per batch of ``--batch`` shapes images:

- uncached, as latent training does without the cache: render the batch (ShapesDataset items), then encode it
  (posterior sample z = μ + σ·ε, as ``latent.sample_posterior`` does) under no_grad;
- cached: read the batch from a :class:`~latentdiff.data.latent_cache.LatentDataset` (item by item, as the
  training DataLoader does, then collated), in sample mode (fresh z per item) and mean mode.

For scale, the last line times one training step (forward, backward, AdamW) of the U-Net of
``configs/shapes_ldm_kl_f4.yaml`` on a batch of 3x8x8 latents, and the one-off cost of building the cache of
``--pool`` items. Figures are milliseconds per batch, medians over ``--repeats`` after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from autoencoder_throughput import timed  # noqa: E402  (median seconds of fn() after one warm-up)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=512, help="items in the cache built for the read timings")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--no-unet", action="store_true", help="skip the U-Net training step timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from latentdiff.data.latent_cache import build_or_load_latent_cache
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig

    section = yaml.safe_load((ROOT / "configs" / "shapes_vae_kl_f4.yaml").read_text())["autoencoder"]
    ae = Autoencoder(AutoencoderConfig.from_dict({**section, "resolution": 32})).eval().requires_grad_(False)
    data = ShapesDataset("train", length=max(args.pool, args.batch), seed=0)
    B = args.batch
    gen = torch.Generator().manual_seed(0)

    def render():
        return default_collate([data[i] for i in range(B)])

    images = render()["image"]

    def encode():
        with torch.no_grad():
            return ae.encode(images, sample=True, generator=gen)

    t_render, t_encode = timed(render, args.repeats), timed(encode, args.repeats)
    with tempfile.TemporaryDirectory() as root:
        identity = {"data": {"name": "shapes", "size": 32}, "length": len(data), "split": "train", "seed": 0}
        fields = ["caption", "label", "cells"]
        t0 = time.perf_counter()
        cached = {"sample": build_or_load_latent_cache(data, ae, root=root, identity=identity, mode="sample",
                                                       pool=args.pool, fields=fields)}
        t_build = time.perf_counter() - t0
        cached["mean"] = build_or_load_latent_cache(data, ae, root=root, identity=identity, mode="mean",
                                                    pool=args.pool, fields=fields)
        perm = torch.randperm(args.pool, generator=gen)[:B].tolist()
        t_read = {m: timed(lambda ds=ds: default_collate([ds[i] for i in perm]), args.repeats)
                  for m, ds in cached.items()}
        t_load = timed(lambda: build_or_load_latent_cache(data, ae, root=root, identity=identity, mode="sample",
                                                          pool=args.pool, fields=fields), 3)

    uncached = t_render + t_encode
    ms = lambda s: f"{1000 * s:9.2f}"  # noqa: E731
    params = sum(p.numel() for p in ae.parameters()) / 1e6
    print(f"KL-f{ae.f} first stage of configs/shapes_vae_kl_f4.yaml ({params:.2f} M params), batch {B} of 32x32 "
          f"shapes images -> latents {tuple(ae.latent_shape(32, 32))}, {torch.get_num_threads()} thread(s)")
    print(f"{'per batch':<44} {'ms':>9} {'vs cached read':>15}")
    rows = [("render shapes images (uncached data)", t_render), ("encode: posterior sample z ~ q(z|x)", t_encode),
            ("uncached total: render + encode", uncached),
            ("cached read, sample mode (z = mu + sigma*eps)", t_read["sample"]),
            ("cached read, mean mode (z = mu)", t_read["mean"])]
    for name, t in rows:
        print(f"{name:<44} {ms(t)} {t / t_read['sample']:>14.1f}x")
    print(f"encode / cached read (sample mode): {t_encode / t_read['sample']:.1f}x; "
          f"saved per step: {1000 * (uncached - t_read['sample']):.1f} ms")
    print(f"one-off: build a cache of {args.pool} items {t_build:.2f} s ({1000 * t_build / args.pool:.2f} ms/item, "
          f"render + encode), reopen it {1000 * t_load:.1f} ms")
    if not args.no_unet:
        t_step = unet_step_time(ae, B, args.repeats)
        with_cache = t_step + t_read["sample"]
        print(f"for scale: one U-Net training step of configs/shapes_ldm_kl_f4.yaml (batch {B}) {1000 * t_step:.1f} ms;"
              " "
              f"with rendering and the encoder a step costs {1000 * (t_step + uncached):.1f} ms, with the cache "
              f"{1000 * with_cache:.1f} ms ({(t_step + uncached) / with_cache:.2f}x faster)")


def unet_step_time(ae, B: int, repeats: int) -> float:
    """Median seconds of one forward + backward + AdamW step of the shapes_ldm_kl_f4 U-Net on latents."""
    from latentdiff.nn.unet import unet_from_preset

    model = yaml.safe_load((ROOT / "configs" / "shapes_ldm_kl_f4.yaml").read_text())["model"]
    preset = model.pop("preset")
    C, h, w = ae.latent_shape(32, 32)
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    unet = unet_from_preset(preset, in_channels=C, out_channels=C, **model)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    z, y = torch.randn(B, C, h, w), torch.randint(0, model.get("num_classes") or 1, (B,))
    t = torch.randint(0, 1000, (B,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (unet(z, t, y=y) - z).pow(2).mean()
        loss.backward()
        opt.step()

    return timed(step, repeats)


if __name__ == "__main__":
    main()
