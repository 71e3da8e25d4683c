"""Compiled and channels-last U-Nets against diffusers' eager and compiled U-Nets, side by side in one run.

    nice -n 19 .venv/bin/python benchmarks/compile_speed.py [--models digits,cifar10,ldm_small] [--modes train,infer]
        [--variants eager,channels_last,compiled] [--threads 1] [--steps 3]

Rows: for each preset (digits 1.8M at batch 32 on 16x16, cifar10 35.7M at batch 4 on 32x32, ldm_small 10.9M at
batch 8 on 4x16x16 latents with an 8x256 context) and mode (train = forward + backward + AdamW; infer = forward
under no_grad), each variant of latentdiff's U-Net (eager, channels_last, torch.compile inductor) and diffusers'
UNet2DModel / UNet2DConditionModel configured alike (eager and compiled). Every measurement runs in a fresh process
with a fresh inductor cache (so the compile time is a cold one), reported apart from the steady step; ``--repeats``
measurements per row in alternating order; ratios (median and best step) are to diffusers eager and diffusers
compiled of the same row. The float32 matmul peak of the same thread count is measured
by each worker right after its steps (the best of them per row), and the training step's FLOPs (FlopCounterMode,
ours) over the fastest step give the fraction of that peak reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from unet_throughput import matmul_peak_gflops  # noqa: E402  (one measurement of the peak for every benchmark)

# name: (batch, side, preset overrides, context (length, width) or None)
MODELS = {
    "digits": (32, 16, {}, None),
    "cifar10": (4, 32, {}, None),
    "ldm_small": (8, 16, {}, (8, 256)),
}


def build(impl: str, name: str) -> torch.nn.Module:
    from latentdiff.nn.unet import PRESETS, unet_from_preset

    if impl == "latentdiff":
        return unet_from_preset(name)
    import diffusers

    c = PRESETS[name]
    levels = range(len(c.channel_mult))
    attn = [2**i in c.attention_resolutions for i in levels]
    widths = tuple(c.model_channels * m for m in c.channel_mult)
    common = dict(sample_size=MODELS[name][1], in_channels=c.in_channels, out_channels=c.out_channels,
                  block_out_channels=widths, layers_per_block=c.num_res_blocks, norm_num_groups=c.num_groups,
                  flip_sin_to_cos=True, freq_shift=0,
                  resnet_time_scale_shift="scale_shift" if c.use_scale_shift_norm else "default")
    if c.context_dim is None:
        heads_dim = (widths[1] // c.num_heads) if c.num_heads > 0 else c.head_channels
        return diffusers.UNet2DModel(
            **common, dropout=c.dropout, attention_head_dim=None if c.num_heads == 1 else heads_dim,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            num_class_embeds=None if c.num_classes is None else c.num_classes + 1)
    heads = tuple(w // c.head_channels if c.head_channels > 0 else c.num_heads for w in widths)
    return diffusers.UNet2DConditionModel(
        **common, cross_attention_dim=c.context_dim, attention_head_dim=heads,
        use_linear_projection=c.use_linear_proj, transformer_layers_per_block=c.transformer_depth,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))  # fmt: skip


def inputs(name: str, model: torch.nn.Module):
    from latentdiff.nn.unet import PRESETS

    batch, side, _, ctx = MODELS[name]
    c = PRESETS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kw = {}
    if ctx is not None:
        kw["context"] = torch.randn(batch, *ctx, generator=g)
    if c.num_classes is not None:
        kw["y"] = torch.randint(0, c.num_classes, (batch,), generator=g)
    return x, t, kw


def call(impl: str, model, x, t, kw):
    if impl == "latentdiff":
        return model(x, t, **kw)
    their = {}
    if "context" in kw:
        their["encoder_hidden_states"] = kw["context"]
    if "y" in kw:
        their["class_labels"] = kw["y"]
    return model(x, t, **their).sample


def worker(impl: str, name: str, mode: str, variant: str, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(impl, name)
    x, t, kw = inputs(name, model)
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if variant == "compiled" else model
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randn_like(x)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(call(impl, run, x, t, kw), target).backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                call(impl, run, x, t, kw)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    peak = matmul_peak_gflops(threads, reps=5)  # in this process, right after its steps: the same conditions
    return dict(sec=sec, best=min(times), first=first, peak_gflops=peak,
                compile_s=max(first - sec, 0.0) if variant == "compiled" else 0,
                img_s=x.shape[0] / sec, params=sum(p.numel() for p in model.parameters()))


def run_worker(args, impl, name, mode, variant) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "--worker", impl, name, mode, variant, "--steps", str(args.steps),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {impl} {name} {mode} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_flops(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build("latentdiff", name).train()
    x, t, kw = inputs(name, model)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(model(x, t, **kw), torch.randn_like(x)).backward()
    return float(counter.get_total_flops())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--variants", default="eager,channels_last,compiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="measurements per row, alternating the order")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads)))
        return
    peak = matmul_peak_gflops(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} timed steps (median); load average "
          f"{os.getloadavg()[0]:.2f}; float32 matmul peak {peak:.1f} GFLOP/s", flush=True)
    variants = args.variants.split(",")
    theirs_variants = [v for v in ("eager", "compiled") if v in variants] or ["eager"]
    order = [("diffusers", v) for v in theirs_variants] + [("latentdiff", v) for v in variants]
    rows = []
    for name in args.models.split(","):
        flops = step_flops(name)
        for mode in args.modes.split(","):
            runs = {k: [] for k in order}
            for r in range(args.repeats):  # the order flips every repeat: a slow spell of the machine hits both
                for key in order if r % 2 == 0 else order[::-1]:
                    runs[key].append(run_worker(args, key[0], name, mode, key[1]))
                    x = runs[key][-1]
                    print(f"  {name} {mode} {key[0]} {key[1]}: {x['sec']:.3f} s/step (best {x['best']:.3f}), first "
                          f"{x['first']:.1f} s", flush=True)
            res = {k: dict(v[0], sec=statistics.median(x["sec"] for x in v), best=min(x["best"] for x in v),
                           compile_s=statistics.median(x["compile_s"] for x in v),
                           peak_gflops=max(x["peak_gflops"] for x in v)) for k, v in runs.items()}
            rows.append((name, mode, flops, res))
    print("img/s from the median step; 'best' ratios from the fastest step of all repeats (load only adds time)")
    print(f"{'model':10} {'mode':5} {'variant':24} | {'img/s':>8} {'/diff eager':>11} {'best':>5} "
          f"{'/diff compiled':>14} {'best':>5} | {'compile s':>9} | {'% matmul peak':>13}")
    for name, mode, flops, res in rows:
        base, comp = res[("diffusers", "eager")], res.get(("diffusers", "compiled"))
        batch = MODELS[name][0]
        for (impl, v), r in res.items():
            vs_comp = f"{comp['sec'] / r['sec']:14.2f} {comp['best'] / r['best']:5.2f}" if comp else f"{'':20}"
            frac = f"{flops / r['best'] / 1e9 / r['peak_gflops']:13.0%}" if mode == "train" else f"{'':13}"
            print(f"{name:10} {mode:5} {impl + ' ' + v:24} | {batch / r['sec']:8.2f} {base['sec'] / r['sec']:11.2f} "
                  f"{base['best'] / r['best']:5.2f} {vs_comp} | {r['compile_s']:9.1f} | {frac}")
        po, pt = res[("latentdiff", variants[0])]["params"], res[("diffusers", "eager")]["params"]
        print(f"{'':10} parameters latentdiff {po / 1e6:.2f}M, diffusers {pt / 1e6:.2f}M")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_peak_gflops": peak, "rows": [
            {"model": n, "mode": m, "flops": f, "rows": {f"{i} {v}": r for (i, v), r in res.items()}}
            for n, m, f, res in rows]}, indent=1))


if __name__ == "__main__":
    main()
