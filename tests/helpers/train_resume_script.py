"""A tiny deterministic training run for the kill-and-resume test (run as a subprocess by test_train.py).

    python -m helpers.train_resume_script OUT_DIR [--resume] [--kill-at-step N] [--kill-in-checkpoint N]

(with tests/ on PYTHONPATH)

--kill-at-step N       SIGKILL this process right after optimizer step N.
--kill-in-checkpoint N SIGKILL it in the middle of writing the checkpoint of step N (after the first file).
"""

import argparse
import os
import signal

import torch

import latentdiff.train.checkpoint as ckpt
from latentdiff.train import TrainConfig, train

from helpers.train_tiny import ToyImages, make_objective

CONFIG = dict(steps=14, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=3, lr_schedule="cosine", checkpoint_every=4,
              keep_checkpoints=0, log_every=2, ema_decay=0.9, deterministic=True, num_workers=0, seed=3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at-step", type=int, default=None)
    ap.add_argument("--kill-in-checkpoint", type=int, default=None)
    args = ap.parse_args()

    if args.kill_in_checkpoint is not None:
        real_save_model, real_save = ckpt._save_model, ckpt.save_checkpoint
        current = {}

        def save_checkpoint(out_dir, step, **kw):
            current["step"] = step
            return real_save(out_dir, step, **kw)

        def save_model(model, path):
            real_save_model(model, path)
            if current.get("step") == args.kill_in_checkpoint:
                os.kill(os.getpid(), signal.SIGKILL)  # half a checkpoint on disk

        ckpt._save_model = save_model
        import latentdiff.train.loop as loop
        loop.save_checkpoint = save_checkpoint

    def callback(step, metrics):
        if step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    # Importance sampling (objective state), model dropout and label dropout (global RNG), accumulation, EMA.
    objective = make_objective(T=10, sampler="loss_second_moment", dropout=0.1, cond_drop_prob=0.3)
    result = train(objective, ToyImages(n=36), TrainConfig(**CONFIG), args.out_dir, resume=args.resume,
                   callback=callback, progress=False)
    print(f"done step={result.step} checkpoint={result.checkpoint}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
