"""The thread count per workload, from a measurement: 1 thread against N, alternating, in one run.

    nice -n 19 .venv/bin/python benchmarks/threads.py [--threads 1,2] [--repeats 3] [--steps 5]

Workloads (each measured in a fresh process started with OMP_NUM_THREADS=n and torch.set_num_threads(n)):

- train_digits: a digits U-Net training step (batch 64, 1x8x8): many small convolutions;
- train_ldm_small: an ldm_small U-Net training step (batch 16, 4x16x16, context 8x256): larger matmuls;
- sample_digits: a guided digits U-Net call (batch 2x16) under no_grad;
- sample_txt2img: a guided call of shapes_ldm_txt2img's U-Net (batch 2x16, 3x8x8) and the KL-f4 decode of 16;
- eval_inception: the FID Inception network on 8 images at 299x299 (eval's feature extraction);
- eval_oracle: the shapes oracle on 256 images at 32x32 (prompt adherence).

For each, the median and best step time at each thread count and the ratio t(N)/t(1): below 1, N threads pay.
The rule drawn from it is in docs/scaling.md ("Threads").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
WORKLOADS = ("train_digits", "train_ldm_small", "sample_digits", "sample_txt2img", "eval_inception", "eval_oracle")


def make(workload: str):
    """A no-argument function doing one step of ``workload``."""
    from latentdiff.nn.unet import UNet, UNetConfig, unet_from_preset

    torch.manual_seed(0)
    if workload.startswith("train"):
        if workload == "train_digits":
            net, x, kw = unet_from_preset("digits"), torch.randn(64, 1, 8, 8), {"y": torch.randint(0, 10, (64,))}
        else:
            net, x = unet_from_preset("ldm_small"), torch.randn(16, 4, 16, 16)
            kw = {"context": torch.randn(16, 8, 256)}
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        t = torch.randint(0, 1000, (x.shape[0],))

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(net(x, t, **kw), x).backward()
            opt.step()
        return step
    if workload == "sample_digits":
        net = unet_from_preset("digits").eval()
        x, t, y = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,)), torch.randint(0, 11, (32,))
        return torch.no_grad()(lambda: net(x, t, y=y))
    if workload == "sample_txt2img":
        from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig

        net = UNet(UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(1, 2), head_channels=32, context_dim=64, use_linear_proj=True,
                              use_scale_shift_norm=True)).eval()
        ae = Autoencoder(AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, embed_dim=3))
        ae.eval()
        x, t, ctx = torch.randn(32, 3, 8, 8), torch.randint(0, 1000, (32,)), torch.randn(32, 25, 64)
        return torch.no_grad()(lambda: (net(x, t, context=ctx), ae.decode(x[:16])))
    if workload == "eval_inception":
        from latentdiff.nn.inception import FIDInceptionV3

        net, x = FIDInceptionV3().eval(), torch.rand(8, 3, 299, 299) * 2 - 1
        return torch.no_grad()(lambda: net(x))
    if workload == "eval_oracle":
        from latentdiff.eval.shapes_oracle import ShapesOracle

        net, x = ShapesOracle().eval(), torch.rand(256, 3, 32, 32) * 2 - 1
        return torch.no_grad()(lambda: net(x))
    raise ValueError(f"unknown workload {workload!r}")


def worker(workload: str, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    step = make(workload)
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "best": min(times)}


def measure(workload: str, threads: int, steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--worker", workload, str(threads), "--steps", str(steps)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload} with {threads} threads failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return None
    counts = [int(n) for n in args.threads.split(",")]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; thread counts {counts}, {args.repeats} "
          f"repeats (order alternating) x {args.steps} steps", flush=True)
    results = {}
    for w in args.workloads.split(","):
        runs = {n: [] for n in counts}
        for r in range(args.repeats):
            for n in counts if r % 2 == 0 else counts[::-1]:
                runs[n].append(measure(w, n, args.steps))
        med = {n: statistics.median(x["median"] for x in v) for n, v in runs.items()}
        best = {n: min(x["best"] for x in v) for n, v in runs.items()}
        results[w] = {"median": med, "best": best}
        lo, hi = counts[0], counts[-1]
        print(f"  {w:16} median s/step " + " ".join(f"{n}T {med[n]:.4f}" for n in counts)
              + f"  ratio {hi}T/{lo}T {med[hi] / med[lo]:.2f} | best " + " ".join(f"{n}T {best[n]:.4f}" for n in counts)
              + f"  ratio {best[hi] / best[lo]:.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
