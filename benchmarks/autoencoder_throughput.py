"""Autoencoder encode / decode throughput per downsampling factor f, and shapes generation against training.

    .venv/bin/python benchmarks/autoencoder_throughput.py [--size 32] [--batch 16] [--ch 64] [--res-blocks 2]
                                                          [--repeats 5] [--threads N] [--factors 1,2,4,8,16,32]

For each f, a KL autoencoder from ``config_for_factor(f, ch, num_res_blocks)`` (ch_mult (1, 2, 2, 4, 4, 4) cut
to log2 f + 1 levels, attention in the middle only) encodes (posterior mean) and decodes a batch under
no_grad; and one training step (forward with a posterior sample, L1 loss, backward, AdamW step) is timed.
Figures are images per second, medians over ``--repeats`` after one warm-up; ratios are against f = 1.

With ``--train-minutes M`` (and/or ``--train-steps N``) it instead trains a KL autoencoder on shapes (f from
``--ch-mult``: 1,2,2 is f = 4; the training loop with AutoencoderObjective: L_rec (L2 by default) + KL, no GAN,
no LPIPS) until the time or the steps are up (it stops before a step would end past the time), then prints
PSNR / SSIM of reconstructions (posterior mean) of held-out test-split images and saves the autoencoder with
its latent scale to ``--out``. Periodic evaluations (``--eval-every``) count as training time.

    .venv/bin/python benchmarks/autoencoder_throughput.py --train-minutes 10 --ch 32 --res-blocks 1 --batch 16 \
        --lr 2e-3 --threads 1 --eval-every 100 --out /tmp/kl_f4

The last table compares the shapes world's generation rate (``ShapesDataset.__getitem__`` in one process) with
the training-step rate of the f = 4 model: a ratio well above 1 means generating on the fly never slows
training, even with ``num_workers=0``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rates(ae, x, repeats: int) -> tuple[tuple, float, float, float]:
    """(latent shape, encode, decode and training-step images per second) of autoencoder ``ae`` on batch ``x``."""
    B = len(x)
    ae.eval()
    with torch.no_grad():
        z = ae.encode(x)
        t_enc = timed(lambda: ae.encode(x), repeats)
        t_dec = timed(lambda: ae.decode(z), repeats)
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-4)

    def step():
        x_rec, info = ae(x)
        loss = (x_rec - x).abs().mean() + 1e-6 * info["kl"].mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_train = timed(step, max(1, repeats // 2))
    return tuple(z.shape[1:]), B / t_enc, B / t_dec, B / t_train


class _TimeUp(Exception):
    pass


def train_and_score(args) -> None:
    """Train a KL autoencoder on shapes for at most --train-minutes / --train-steps; print held-out PSNR / SSIM."""
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig
    from latentdiff.train import TrainConfig, train
    from latentdiff.train.autoencoder_objective import AutoencoderLossConfig, AutoencoderObjective

    S = args.size
    ch_mult = tuple(int(m) for m in args.ch_mult.split(","))
    cfg = AutoencoderConfig(ch=args.ch, ch_mult=ch_mult, num_res_blocks=args.res_blocks,
                            z_channels=3, embed_dim=3, resolution=S, norm_groups=args.norm_groups,
                            regularizer=args.regularizer, n_embed=args.n_embed)
    ae = Autoencoder(cfg)
    obj = AutoencoderObjective(ae, config=AutoencoderLossConfig(rec_loss=args.rec_loss, kl_weight=1e-6))
    data = ShapesDataset("train", length=10_000_000, size=S, seed=0)
    test = ShapesDataset("test", length=args.test_images, size=S, seed=1)
    x_test = torch.stack([test[i]["image"] for i in range(len(test))])
    steps = args.train_steps or 10_000_000
    tc = TrainConfig(steps=steps, batch_size=args.batch, lr=args.lr, warmup_steps=min(100, steps // 10),
                     lr_schedule="cosine" if args.train_steps else "constant", grad_clip=1.0, ema_decay=0.0,
                     log_every=50, checkpoint_every=0, seed=0)
    limit = args.train_minutes * 60 if args.train_minutes else float("inf")
    t0 = time.perf_counter()
    done = [0]

    def stop_when_time_is_up(step, metrics):
        done[0] = step
        if args.eval_every and step % args.eval_every == 0:
            sc = obj.evaluate(x_test[:128])
            vq = ""
            if "perplexity" in metrics:
                vq = f", perplexity {metrics['perplexity']:.1f}, usage {metrics['usage']:.2f}"
            print(f"step {step} ({(time.perf_counter() - t0) / 60:.2f} min): held-out PSNR {sc['psnr']:.2f} dB "
                  f"({min(128, len(x_test))} images), batch rec_loss {metrics['rec_loss']:.4f}{vq}", flush=True)
        elapsed = time.perf_counter() - t0
        if elapsed * (step + 1) / step > limit:  # the next step would end past the limit
            raise _TimeUp

    params = sum(p.numel() for p in ae.parameters()) / 1e6
    print(f"training {cfg.regularizer.upper()}-f{cfg.f} ({params:.2f} M params, ch {cfg.ch}, ch_mult "
          f"{cfg.ch_mult}, {cfg.num_res_blocks} res blocks) on shapes {S}x{S}, batch {args.batch}, lr {args.lr}, "
          f"{torch.get_num_threads()} threads, for at most {args.train_minutes or '-'} min / "
          f"{args.train_steps or '-'} steps", flush=True)
    try:
        train(obj, data, tc, args.out + "_run", progress=False, callback=stop_when_time_is_up)
    except _TimeUp:
        pass
    minutes = (time.perf_counter() - t0) / 60
    scores = obj.evaluate(x_test)
    print(f"after {done[0]} steps ({done[0] * args.batch} images) in {minutes:.2f} min: "
          f"held-out PSNR {scores['psnr']:.2f} dB, "
          f"SSIM {scores['ssim']:.4f}, L1 {scores['l1']:.4f} on {len(x_test)} test-split images", flush=True)
    first = torch.stack([data[i]["image"] for i in range(args.batch)])
    scale = obj.export(args.out, first)
    print(f"saved to {args.out} (latent scale {scale:.4f})")


def main(argv=None):
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.nn.autoencoder import Autoencoder, config_for_factor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ch", type=int, default=64)
    ap.add_argument("--res-blocks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--factors", default="1,2,4,8,16,32")
    ap.add_argument("--train-minutes", type=float, default=0.0,
                    help="train KL-f4 on shapes for this long, then score it")
    ap.add_argument("--train-steps", type=int, default=0, help="... or for this many steps (cosine lr decay)")
    ap.add_argument("--ch-mult", default="1,2,2", help="training run: ch_mult (f = 2^(len-1))")
    ap.add_argument("--norm-groups", type=int, default=32, help="training run: GroupNorm groups")
    ap.add_argument("--regularizer", default="kl", choices=("kl", "vq"), help="training run: KL or VQ autoencoder")
    ap.add_argument("--n-embed", type=int, default=256, help="training run: VQ codebook size")
    ap.add_argument("--rec-loss", default="l2", choices=("l1", "l2"),
                    help="training run: L_rec (l2 optimises PSNR directly)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-images", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="training run: print held-out PSNR every N steps (0 = never)")
    ap.add_argument("--out", default="/tmp/latentdiff_kl_f4")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_minutes or args.train_steps:
        return train_and_score(args)
    torch.manual_seed(0)
    B, S = args.batch, args.size
    x = torch.rand(B, 3, S, S) * 2 - 1
    rows = []
    train_rate = {}
    for f in (int(v) for v in args.factors.split(",")):
        config = config_for_factor(f, ch=args.ch, num_res_blocks=args.res_blocks, resolution=S, z_channels=3,
                                   embed_dim=3)
        ae = Autoencoder(config)
        params = sum(p.numel() for p in ae.parameters()) / 1e6
        shape, enc, dec, tr = rates(ae, x, args.repeats)
        train_rate[f] = tr
        rows.append((f, shape, params, enc, dec, tr))

    print(f"KL autoencoder, {S}x{S} images, batch {B}, ch {args.ch}, {args.res_blocks} res blocks, "
          f"{torch.get_num_threads()} threads; images/s (median of {args.repeats})")
    print(f"{'f':>3} {'latent':>12} {'params(M)':>9} {'encode':>9} {'decode':>9} {'train':>9} "
          f"{'enc/enc1':>8} {'dec/dec1':>8} {'train/train1':>12}")
    base = rows[0]
    for f, shape, params, enc, dec, tr in rows:
        print(f"{f:>3} {str(shape):>12} {params:>9.2f} {enc:>9.1f} {dec:>9.1f} {tr:>9.1f} "
              f"{enc / base[3]:>8.2f} {dec / base[4]:>8.2f} {tr / base[5]:>12.2f}")

    for split in ("train", "test"):
        ds = ShapesDataset(split, length=100_000, size=S)
        n = 400
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        gen = n / (time.perf_counter() - t)
        ref = train_rate.get(4, next(iter(train_rate.values())))
        print(f"shapes {split} generation: {gen:.0f} images/s in one process; KL-f4 training step: {ref:.1f} images/s; "
              f"ratio {gen / ref:.1f}")


if __name__ == "__main__":
    main()
