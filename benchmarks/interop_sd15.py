"""Stable Diffusion interop figures: load times and peak memory, and an SD-1.5-sized U-Net forward against diffusers.

    nice -n 19 .venv/bin/python benchmarks/interop_sd15.py all --work /tmp/sd15 [--threads 2] [--repeats 2]

Steps (each load in a fresh process, so ru_maxrss is that load's peak resident memory):

- ``build``: an SD-1.5-sized pipeline (U-Net preset sd1, the SD first stage, a CLIP ViT-L/14 text model) built
  on the meta device (no memory), then on the CPU with random weights; times and peak RSS; then written as a
  diffusers folder with latentdiff's exporter (random weights: nothing is downloaded).
- ``load``: that folder read by ``latentdiff.load`` and by ``diffusers.StableDiffusionPipeline.from_pretrained``;
  time and peak RSS each, and the ratio.
- ``tiny``: the tiny test pipelines (tests/helpers/tiny_sd.py) loaded by both, median of 5 loads.
- ``forward``: the SD-1.5 U-Net forward (64 x 64 latents, 77 context tokens, float32, no_grad), latentdiff's and
  diffusers' with the same weights (diffusers' model takes our tensors by the importer's key map), batch 1 and 2,
  alternating, median of ``--repeats`` after a warm-up; ratio = diffusers time / latentdiff time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sd15_parts(device: str):
    """(UNet, Autoencoder, CLIPTextModel) of SD 1.5's sizes on ``device``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig
    from latentdiff.nn.unet import unet_from_preset

    with torch.device(device):
        unet = unet_from_preset("sd1")
        vae = Autoencoder(AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                                            resolution=512))
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                            hidden_act="quick_gelu"))
    return unet, vae, text


def cmd_build(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import transformers  # noqa: F401  (its import is not part of the build time)

    from latentdiff.interop import save
    from latentdiff.interop.assemble import assemble
    from latentdiff.interop.clip import ClipConditioner, load_tokenizer

    from helpers.tiny_sd import write_tokenizer

    t = time.perf_counter()
    meta = sd15_parts("meta")
    t_meta = time.perf_counter() - t
    n = sum(p.numel() for m in meta for p in m.parameters())
    rss_meta = peak_mb()
    t = time.perf_counter()
    unet, vae, text = sd15_parts("cpu")
    t_cpu = time.perf_counter() - t
    rss_cpu = peak_mb()
    vae.latent_scale = 0.18215
    tok_dir = Path(args.work) / "tok"
    write_tokenizer(tok_dir)  # a small BPE vocabulary: the tokenizer's size does not matter here
    diffusion = {"schedule": "scaled_linear", "num_steps": 1000, "prediction": "eps",
                 "schedule_options": {"beta_start": 0.00085, "beta_end": 0.012}}
    pipe = assemble(unet, vae.eval(), ClipConditioner(text.eval(), load_tokenizer(tok_dir)), diffusion,
                    {"sampler": "plms", "spacing": "leading", "offset": 1, "set_alpha_to_one": False}, 512, "sd15")
    t = time.perf_counter()
    save(pipe, Path(args.work) / "folder", "diffusers")
    t_save = time.perf_counter() - t
    return {"params": n, "meta_s": t_meta, "meta_peak_mb": rss_meta, "cpu_s": t_cpu, "cpu_peak_mb": rss_cpu,
            "save_s": t_save}


def _timed_loads(fn) -> dict:
    """First load (libraries imported beforehand, file possibly in the page cache) and a second one; peak RSS."""
    rss0 = peak_mb()
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    peak = peak_mb()
    t = time.perf_counter()
    fn()
    return {"s": first, "second_s": time.perf_counter() - t, "peak_mb": peak, "before_mb": rss0}


def cmd_load_ours(args) -> dict:
    import transformers  # noqa: F401  (imported before timing, as diffusers' is)

    import latentdiff
    import latentdiff.interop  # noqa: F401

    return _timed_loads(lambda: latentdiff.load(Path(args.work) / "folder"))


def cmd_load_diffusers(args) -> dict:
    import diffusers
    import transformers  # noqa: F401

    return _timed_loads(lambda: diffusers.StableDiffusionPipeline.from_pretrained(
        Path(args.work) / "folder", safety_checker=None, requires_safety_checker=False))


def cmd_tiny(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import diffusers

    import latentdiff

    from helpers.tiny_sd import build

    folder = build(Path(args.work) / "tiny", "sd1")
    out = {}
    for name, fn in [("latentdiff", lambda: latentdiff.load(folder)),
                     ("diffusers", lambda: diffusers.StableDiffusionPipeline.from_pretrained(
                         folder, safety_checker=None, requires_safety_checker=False))]:
        fn()  # warm: imports, file cache
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def cmd_forward(args) -> dict:
    import diffusers

    from latentdiff.interop.unet_keys import unet_config_to_diffusers, unet_key_map

    torch.set_num_threads(args.threads)
    unet, _, _ = sd15_parts("cpu")
    unet.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the zero-initialised output layers get values, so that the outputs can be compared
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    cfg = {k: v for k, v in unet_config_to_diffusers(unet.config, 64).items() if k != "_class_name"}
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**cfg)
    names, state = unet_key_map(unet.config, "diffusers"), unet.state_dict()
    theirs.load_state_dict({names[k]: v for k, v in state.items()}, assign=True)  # the same tensors, shared
    theirs.eval()
    out = {}
    with torch.no_grad():
        for b in (1, 2):
            g = torch.Generator().manual_seed(0)
            x, ctx = torch.randn(b, 4, 64, 64, generator=g), torch.randn(b, 77, 768, generator=g)
            t = torch.full((b,), 500)
            ref = theirs(x, t, encoder_hidden_states=ctx).sample
            diff = ((unet(x, t, context=ctx) - ref).abs().max() / ref.abs().max()).item()
            times = {"latentdiff": [], "diffusers": []}
            for _ in range(args.repeats):
                for name, fn in (("latentdiff", lambda x=x, t=t, ctx=ctx: unet(x, t, context=ctx)),
                                 ("diffusers", lambda x=x, t=t, ctx=ctx: theirs(x, t, encoder_hidden_states=ctx))):
                    s = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - s)
            med = {k: statistics.median(v) for k, v in times.items()}
            out[f"batch{b}"] = {**med, "ratio_diffusers_over_latentdiff": med["diffusers"] / med["latentdiff"],
                                "max_rel_diff": diff, "runs": times}
    return out


def run_step(step: str, args) -> dict:
    cmd = [sys.executable, __file__, step, "--work", args.work, "--threads", str(args.threads), "--repeats",
           str(args.repeats), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("all", "build", "load_ours", "load_diffusers", "tiny", "forward"))
    p.add_argument("--work", default="/tmp/sd15")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", default="tiny,build,load_ours,load_diffusers,forward", help="steps of `all`")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    steps = {"build": cmd_build, "load_ours": cmd_load_ours, "load_diffusers": cmd_load_diffusers, "tiny": cmd_tiny,
             "forward": cmd_forward}
    if args.step != "all":
        print(json.dumps(steps[args.step](args)))
        return
    res = {s: run_step(s, args) for s in args.steps.split(",")}
    print(json.dumps(res, indent=1))
    if "build" in res:
        b = res["build"]
        print(f"\nSD-1.5-sized pipeline, {b['params'] / 1e6:.0f}M parameters")
        print(f"  build on meta: {b['meta_s']:.2f} s, peak RSS {b['meta_peak_mb']:.0f} MB")
        print(f"  build on CPU (random init): {b['cpu_s']:.1f} s, peak RSS {b['cpu_peak_mb']:.0f} MB")
    if "load_ours" in res and "load_diffusers" in res:
        lo, ld = res["load_ours"], res["load_diffusers"]
        print(f"  load its diffusers folder: latentdiff {lo['s']:.1f} s (again {lo['second_s']:.1f} s), peak RSS "
              f"{lo['peak_mb']:.0f} MB; diffusers {ld['s']:.1f} s (again {ld['second_s']:.1f} s), peak RSS "
              f"{ld['peak_mb']:.0f} MB; time ratio diffusers/latentdiff {ld['s'] / lo['s']:.2f}")
    if "tiny" in res:
        t = res["tiny"]
        print(f"tiny pipeline load: latentdiff {t['latentdiff']:.3f} s, diffusers {t['diffusers']:.3f} s, "
              f"ratio diffusers/latentdiff {t['diffusers'] / t['latentdiff']:.2f}")
    for k, v in res.get("forward", {}).items():
        print(f"SD-1.5 U-Net forward {k}, 64x64: latentdiff {v['latentdiff']:.2f} s, diffusers {v['diffusers']:.2f} s,"
              f" ratio diffusers/latentdiff {v['ratio_diffusers_over_latentdiff']:.2f}"
              f" (max relative difference {v['max_rel_diff']:.1e})")


if __name__ == "__main__":
    main()
