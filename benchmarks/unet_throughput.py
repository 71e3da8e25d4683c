"""U-Net throughput and memory: latentdiff's UNet against diffusers' UNet2DModel configured alike.

    .venv/bin/python benchmarks/unet_throughput.py [--repeats 3] [--steps 3] [--threads N] [--channels-last]

On a machine shared with other work, use --threads 1: with 2 OpenMP threads and a busy core every parallel
region waits for the descheduled thread and timings swing by 10x; the best-of figures are the robust ones.

For each model (a small 32x32 U-Net at batch 8, the DDPM CIFAR-10 U-Net at batch 4) and each mode
(train = forward + backward + AdamW step; infer = forward under no_grad), every measurement runs in a fresh
subprocess, alternating ours / theirs (the order flips each repeat); figures are medians over repeats.

Memory method: peak resident set size of that subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
reported as the peak above the RSS measured after the model, optimizer and inputs were built and before the
first step (so the import footprint of torch / diffusers cancels). It covers activations, gradients, AdamW
state and allocator workspace: everything the step made resident.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one training step of ours (convolutions, matmuls,
attention; forward and backward), divided by the median step time, against a float32 matmul peak measured
in this same run with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MODELS = {
    # name: (batch, size, UNetConfig fields)
    "small32": (8, 32, dict(in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                            num_res_blocks=2, attention_resolutions=(2,), num_heads=1, dropout=0.1)),
    "cifar10": (4, 32, dict(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2),
                            num_res_blocks=2, attention_resolutions=(2,), num_heads=1, dropout=0.1)),
}  # fmt: skip


def build(impl: str, fields: dict, size: int) -> torch.nn.Module:
    if impl == "ours":
        from latentdiff.nn.unet import UNet, UNetConfig

        return UNet(UNetConfig(**fields))
    from diffusers import UNet2DModel

    mc, mult = fields["model_channels"], fields["channel_mult"]
    levels = range(len(mult))
    attn = [2**i in fields["attention_resolutions"] for i in levels]
    return UNet2DModel(
        sample_size=size,
        in_channels=fields["in_channels"],
        out_channels=fields["out_channels"],
        block_out_channels=tuple(mc * m for m in mult),
        layers_per_block=fields["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None,  # one head of all channels, as num_heads=1
        dropout=fields["dropout"],
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,  # cos first, as ours
        freq_shift=0,
    )


def call(impl: str, model, x, t):
    return model(x, t) if impl == "ours" else model(x, t).sample


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(impl: str, name: str, mode: str, steps: int, warmup: int, threads: int, channels_last: bool) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, size, fields = MODELS[name]
    model = build(impl, fields, size)
    x = torch.randn(batch, fields["in_channels"], size, size)
    t = torch.randint(0, 1000, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randn_like(x)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(call(impl, model, x, t), target)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                call(impl, model, x, t)

    base = rss_kb()
    times, cpu_times = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(
        sec=statistics.median(times),
        img_s=batch / statistics.median(times),
        best_img_s=batch / min(times),  # interference only adds time: the fastest step is the least disturbed
        img_cpu_s=batch / statistics.median(cpu_times),  # per CPU-second of this process (all threads)
        peak_mb=peak / 1024,
        peak_above_model_mb=(peak - base) / 1024,
        params=sum(p.numel() for p in model.parameters()),
    )


def run_worker(args, impl, name, mode) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, name, mode, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    if args.channels_last:
        cmd.append("--channels-last")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {impl} {name} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(threads: int, n: int = 1024, reps: int = 10) -> float:
    """Best-of float32 matmul rate (GFLOP/s) on this machine with this thread count."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def train_step_flops(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiff.nn.unet import UNet, UNetConfig

    batch, size, fields = MODELS[name]
    model = UNet(UNetConfig(**fields)).train()
    x = torch.randn(batch, fields["in_channels"], size, size)
    t = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(model(x, t), torch.randn_like(x)).backward()
    return float(counter.get_total_flops())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    args = p.parse_args()
    if args.worker:
        impl, name, mode = args.worker
        print(json.dumps(worker(impl, name, mode, args.steps, args.warmup, args.threads, args.channels_last)))
        return

    print(f"torch {torch.__version__}, {args.threads} threads, repeats {args.repeats}, steps {args.steps}, "
          f"channels_last={args.channels_last}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    peak = matmul_peak_gflops(args.threads)
    print(f"float32 matmul peak (1024^2, best of 10): {peak:.1f} GFLOP/s")
    rows = []
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            res = {"ours": [], "theirs": []}
            for r in range(args.repeats):
                for impl in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
                    res[impl].append(run_worker(args, impl, name, mode))
            med = {k: {f: statistics.median(d[f] for d in v) for f in v[0]} for k, v in res.items()}
            for k, v in res.items():
                med[k]["best_img_s"] = max(d["best_img_s"] for d in v)
            rows.append((name, mode, med, res))
            po, pt = med["ours"]["params"], med["theirs"]["params"]
            assert abs(po - pt) / pt < 0.02, f"{name}: parameter counts differ by more than 2% ({po} vs {pt})"

    print("img/s: wall clock; img/cpu-s: per CPU-second of the process (less sensitive to other load);")
    print("peak MB: peak RSS above the RSS after building model, optimizer and inputs; ratio = ours/theirs")
    print(f"{'model':8} {'mode':5} {'params ours/theirs':>18} | {'img/s ours':>10} {'theirs':>7} {'ratio':>5} | "
          f"{'img/cpu-s ours':>14} {'theirs':>7} {'ratio':>5} | "
          f"{'peak MB ours':>12} {'theirs':>7} {'ratio':>5}")  # fmt: skip
    for name, mode, med, _ in rows:
        o, t = med["ours"], med["theirs"]
        print(f"{name:8} {mode:5} {o['params'] / 1e6:8.2f}M/{t['params'] / 1e6:.2f}M | "
              f"{o['img_s']:10.2f} {t['img_s']:7.2f} {o['img_s'] / t['img_s']:5.2f} | "
              f"{o['img_cpu_s']:14.2f} {t['img_cpu_s']:7.2f} {o['img_cpu_s'] / t['img_cpu_s']:5.2f} | "
              f"{o['peak_above_model_mb']:12.0f} {t['peak_above_model_mb']:7.0f} "
              f"{o['peak_above_model_mb'] / t['peak_above_model_mb']:5.2f}")  # fmt: skip
    print("best-of img/s (fastest step over all repeats; robust to load from other processes):")
    for name, mode, med, _ in rows:
        o, t = med["ours"]["best_img_s"], med["theirs"]["best_img_s"]
        print(f"  {name:8} {mode:5} ours {o:8.2f}  theirs {t:8.2f}  ratio {o / t:5.2f}")
    print("per-repeat img/s (ours | theirs):")
    for name, mode, _, res in rows:
        ours, theirs = ([round(d["img_s"], 2) for d in res[k]] for k in ("ours", "theirs"))
        print(f"  {name} {mode}: {ours} | {theirs}")
    for name, mode, med, _ in rows:
        if mode == "train":
            flops = train_step_flops(name)
            achieved = flops / med["ours"]["sec"] / 1e9
            print(f"{name} train step: {flops / 1e9:.1f} GFLOP (fwd+bwd), ours {achieved:.1f} GFLOP/s = "
                  f"{achieved / peak:.0%} of the matmul peak")  # fmt: skip


if __name__ == "__main__":
    main()
