"""Time per step of every registered sampler against the bare model call it wraps.

The model is a stack of 3x3 convolutions (64 channels at 32x32, batch 8), about a small UNet's cost on a CPU.
Each sampler runs through ``latentdiff.samplers.sample`` (grid, generators, binding included); the time spent
inside the model is measured call by call, and the rest is the sampler's overhead.

    .venv/bin/python benchmarks/sampler_overhead.py [--steps 10] [--repeats 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.samplers import SAMPLERS, sample
from latentdiff.schedules import make_betas


def conv_stack(channels: int = 64, layers: int = 4, data_channels: int = 3) -> nn.Module:
    """in -> 64 -> ... -> 64 -> in, 3x3 convolutions with SiLU; the timestep is ignored."""
    mods, c_in = [], data_channels
    for i in range(layers):
        c_out = data_channels if i == layers - 1 else channels
        mods.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if i < layers - 1:
            mods.append(nn.SiLU())
        c_in = c_out
    return nn.Sequential(*mods)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="runs per sampler; the fastest is reported")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0 = leave as is)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = conv_stack().to(device).eval()
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    noise = torch.randn(args.batch, 3, args.size, args.size, device=device)
    spent = {"model": 0.0, "calls": 0}

    def model_fn(x, t):
        sync(device)
        t0 = time.perf_counter()
        out = net(x)
        sync(device)
        spent["model"] += time.perf_counter() - t0
        spent["calls"] += 1
        return out

    with torch.no_grad():
        for _ in range(3):  # warm-up
            net(noise)
        bare = []
        for _ in range(20):
            sync(device)
            t0 = time.perf_counter()
            net(noise)
            sync(device)
            bare.append(time.perf_counter() - t0)
    bare_ms = 1e3 * sorted(bare)[len(bare) // 2]
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {params} parameters, batch {args.batch}x3x{args.size}x{args.size}, "
          f"{device}, threads {torch.get_num_threads()}; bare call {bare_ms:.2f} ms (median of 20)")
    print(f"{'sampler':<16} {'ms/step':>8} {'calls/step':>10} {'model ms/step':>13} {'overhead ms/step':>16} "
          f"{'overhead %':>10}")
    for name in SAMPLERS:
        opts = {"corrector_steps": 1} if name == "langevin" else {}
        best = None
        for _ in range(args.repeats):
            spent.update(model=0.0, calls=0)
            sync(device)
            t0 = time.perf_counter()
            sample(model_fn, noise, diffusion=diffusion, sampler=name, steps=args.steps, seed=0, **opts)
            sync(device)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, spent["model"], spent["calls"])
        total, model, calls = best
        n = args.steps
        over = total - model
        print(f"{name:<16} {1e3 * total / n:8.2f} {calls / n:10.2f} {1e3 * model / n:13.2f} {1e3 * over / n:16.3f} "
              f"{100 * over / model:9.1f}%")


if __name__ == "__main__":
    main()
