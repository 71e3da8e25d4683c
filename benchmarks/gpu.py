"""GPU benchmark: an SD-1.5-sized U-Net training step and sampling, latentdiff against diffusers, in one run.

    python benchmarks/gpu.py                      # CUDA: SD 1.5 U-Net (860M), bf16 autocast, 64x64 latents
    python benchmarks/gpu.py --device cpu --tiny  # anywhere: a tiny U-Net, float32 (the test that the script works)
    python benchmarks/gpu.py --json out.json      # the figures as JSON too

Rows, for latentdiff's ``UNet`` (preset sd1) and diffusers' ``UNet2DConditionModel`` with SD 1.5's config:

- train: one step (forward, backward, AdamW) at batch 8 and 32 on 4x64x64 latents with a 77x768 text context,
  bf16 autocast on CUDA (float32 on CPU); step time, images/s, achieved TFLOP/s and MFU. FLOPs are counted
  by ``torch.utils.flop_counter.FlopCounterMode`` over one step of latentdiff's model (the two models are the
  same network, so the same count serves both); MFU = achieved / peak, where the peak is the device's dense
  bf16 figure from :data:`PEAK_TFLOPS` when its name is listed, else a bf16 matmul measured in this run.
- sample: images/s of the U-Net part of sampling at batch 1 and 8: classifier-free guidance runs one forward
  pass at 2x the batch per step, ``--sample-steps`` steps (decode and text encoding are not included).
- memory: the peak allocated CUDA memory of each row (CPU: the process's peak RSS, one figure for the run).

``--compile`` adds torch.compile (inductor) rows, with the compile time apart from the steady step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "V100": 125.0,  # fp16 (V100 has no bf16)
}  # fmt: skip

SD15 = dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2, heads=8, context_dim=768, latent=64,
            context_len=77)
TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, heads=2, context_dim=32, latent=8,
            context_len=7)


def build(impl: str, s: dict) -> torch.nn.Module:
    """latentdiff's UNet or diffusers' UNet2DConditionModel, both SD-1.x-shaped with the sizes of ``s``."""
    levels = len(s["channel_mult"])
    if impl == "latentdiff":
        from latentdiff.nn.unet import UNet, UNetConfig

        return UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=s["model_channels"],
                               channel_mult=s["channel_mult"], num_res_blocks=s["num_res_blocks"],
                               attention_resolutions=tuple(2**i for i in range(max(levels - 1, 1))),
                               num_heads=s["heads"], context_dim=s["context_dim"],
                               num_groups=min(32, s["model_channels"])))
    from diffusers import UNet2DConditionModel

    cross = max(levels - 1, 1)
    return UNet2DConditionModel(
        sample_size=s["latent"], in_channels=4, out_channels=4,
        block_out_channels=tuple(s["model_channels"] * m for m in s["channel_mult"]),
        layers_per_block=s["num_res_blocks"],
        down_block_types=("CrossAttnDownBlock2D",) * cross + ("DownBlock2D",) * (levels - cross),
        up_block_types=("UpBlock2D",) * (levels - cross) + ("CrossAttnUpBlock2D",) * cross,
        cross_attention_dim=s["context_dim"], attention_head_dim=s["heads"],
        norm_num_groups=min(32, s["model_channels"]),
    )  # fmt: skip


def forward(impl: str, model, x, t, ctx):
    return model(x, t, context=ctx) if impl == "latentdiff" else model(x, t, encoder_hidden_states=ctx).sample


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of ``steps`` calls after ``warmup`` more)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best-of rate of an n x n matmul in ``dtype`` on ``device``."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    _, sec = timed(lambda: a @ b, device, steps=10, warmup=2)
    return 2 * n**3 / sec / 1e12


def listed_peak(name: str) -> float | None:
    for key, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # the longest matching name wins
        if key in name:
            return value
    return None


def step_flops(s: dict, batch: int, device) -> float:
    """FLOPs of one training step (forward + backward) of latentdiff's model: counted at batch 1 on ``device`` and
    multiplied by ``batch`` (every layer's work is linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build("latentdiff", s).to(device)
    x, t, ctx = inputs(s, 1, device)
    with FlopCounterMode(display=False) as counter:
        model(x, t, context=ctx).float().pow(2).mean().backward()
    del model
    return float(counter.get_total_flops()) * batch


def inputs(s: dict, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, s["latent"], s["latent"], generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, s["context_len"], s["context_dim"], generator=g).to(device)
    return x, t, ctx


def bench_train(impl, s, batch, device, amp, steps, warmup, compile_: bool) -> dict:
    reset_memory(device)
    torch.manual_seed(0)
    model = build(impl, s).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    run = torch.compile(model) if compile_ else model
    x, t, ctx = inputs(s, batch, device)
    target = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(impl, run, x, t, ctx)
        torch.nn.functional.mse_loss(out.float(), target).backward()
        opt.step()

    first, sec = timed(step, device, steps, warmup)
    row = dict(impl=impl, kind="train", batch=batch, compiled=compile_, sec=sec, img_s=batch / sec,
               first_s=first, compile_s=max(first - sec, 0.0) if compile_ else None, peak_mb=peak_memory_mb(device),
               params=sum(p.numel() for p in model.parameters()))
    return row  # the model and optimizer are freed on return


@torch.no_grad()
def bench_sample(impl, s, batch, device, amp, sample_steps, repeats, compile_: bool) -> dict:
    reset_memory(device)
    torch.manual_seed(0)
    model = build(impl, s).to(device).eval()
    run = torch.compile(model) if compile_ else model
    x, t, ctx = inputs(s, 2 * batch, device)  # classifier-free guidance: conditional + unconditional in one pass

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            forward(impl, run, x, t, ctx)

    first, sec = timed(one_step, device, steps=repeats, warmup=1)
    per_image = sec * sample_steps / batch
    row = dict(impl=impl, kind="sample", batch=batch, compiled=compile_, sec=sec * sample_steps, img_s=1 / per_image,
               first_s=first, compile_s=max(first - sec, 0.0) if compile_ else None, peak_mb=peak_memory_mb(device),
               params=sum(p.numel() for p in model.parameters()))
    return row


def count_flops(device: torch.device) -> dict:
    """FLOPs per image of the SD 1.5 U-Net (64x64 latents, 77x768 context): training step and forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    train = step_flops(SD15, 1, device)
    model = build("latentdiff", SD15).to(device)
    x, t, ctx = inputs(SD15, 1, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, context=ctx)
    forward_flops = float(counter.get_total_flops())
    params = sum(p.numel() for p in model.parameters())
    print(f"SD 1.5 U-Net ({params / 1e6:.1f}M parameters), per image at 4x64x64 latents with a 77x768 context: "
          f"training step (forward + backward) {train / 1e12:.3f} TFLOP, forward {forward_flops / 1e12:.3f} TFLOP")
    return {"train_flops": train, "forward_flops": forward_flops, "params": params}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net (for CPUs and the test); default on CPU")
    p.add_argument("--train-batches", default="8,32")
    p.add_argument("--sample-batches", default="1,8")
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps per image (U-Net calls with CFG)")
    p.add_argument("--impls", default="latentdiff,diffusers")
    p.add_argument("--compile", action="store_true", help="also torch.compile (inductor) rows")
    p.add_argument("--json", default=None, help="write the figures here too")
    p.add_argument("--count-flops", action="store_true", help="only print the FLOPs of one image's training step "
                   "and forward pass of the SD 1.5 U-Net (counted on --device; minutes on a CPU) and exit")
    args = p.parse_args(argv)
    if args.count_flops:
        return count_flops(torch.device(args.device))

    device = torch.device(args.device)
    tiny = args.tiny or device.type != "cuda"
    s = TINY if tiny else SD15
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    mm_dtype = torch.bfloat16 if amp else torch.float32
    measured = matmul_peak_tflops(device, mm_dtype, 8192 if device.type == "cuda" else 512)
    peak = listed_peak(name) if device.type == "cuda" else None
    peak_source = "data sheet" if peak else f"measured {str(mm_dtype)[6:]} matmul"
    peak = peak or measured
    print(f"device: {name}; torch {torch.__version__}; {'SD 1.5 U-Net' if not tiny else 'tiny U-Net'}, "
          f"{'bf16 autocast' if amp else 'float32'}, latents 4x{s['latent']}x{s['latent']}")
    print(f"peak for MFU: {peak:.3g} TFLOP/s ({peak_source}); measured {str(mm_dtype)[6:]} matmul "
          f"{measured:.3g} TFLOP/s")

    rows = []
    variants = [False, True] if args.compile else [False]
    for compile_ in variants:
        for impl in args.impls.split(","):
            for b in (int(v) for v in args.train_batches.split(",")):
                r = bench_train(impl, s, b, device, amp, args.steps, args.warmup, compile_)
                r["tflop_s"] = step_flops(s, b, device) / r["sec"] / 1e12
                r["mfu"] = r["tflop_s"] / peak
                rows.append(r)
            for b in (int(v) for v in args.sample_batches.split(",")):
                rows.append(bench_sample(impl, s, b, device, amp, args.sample_steps, max(args.steps // 2, 1),
                                         compile_))

    print(f"{'impl':10} {'kind':6} {'batch':>5} {'compiled':>8} | {'s/step':>8} {'img/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} | {'compile s':>9} {'peak MB':>9}")
    for r in rows:
        tf = f"{r['tflop_s']:8.3g} {r['mfu']:6.1%}" if "tflop_s" in r else f"{'':8} {'':6}"
        comp = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else f"{'':9}"
        print(f"{r['impl']:10} {r['kind']:6} {r['batch']:5d} {str(r['compiled']):>8} | {r['sec']:8.4f} "
              f"{r['img_s']:9.2f} {tf} | {comp} {r['peak_mb']:9.0f}")
    ratios = {}
    for r in rows:
        if r["impl"] == "latentdiff":
            twin = [o for o in rows if o["impl"] == "diffusers" and
                    (o["kind"], o["batch"], o["compiled"]) == (r["kind"], r["batch"], r["compiled"])]
            if twin:
                key = f"{r['kind']} b{r['batch']}{' compiled' if r['compiled'] else ''}"
                ratios[key] = r["img_s"] / twin[0]["img_s"]
    if ratios:
        print("speed ratio latentdiff / diffusers: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    result = {"device": name, "tiny": tiny, "amp_bf16": amp, "peak_tflops": peak, "peak_source": peak_source,
              "matmul_tflops": measured, "rows": rows, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
