"""A tiny training run that SIGKILLs itself at a chosen moment (run as a subprocess by test_kill_anywhere.py).

    python -m helpers.kill_script OUT_DIR [--resume] [--kill MOMENT]
    python -m helpers.kill_script --serve

(with tests/ on PYTHONPATH). ``--serve`` imports torch once and then, for each line ``OUT_DIR [--resume] [--kill
MOMENT]`` read from stdin, forks a process that runs it, prints ``pid N`` and, when it has ended, ``exit CODE``
(-9 for SIGKILL): a kill then costs a fork instead of a Python start with its imports. MOMENT is one of

    step:N        right after optimizer step N (its checkpoint, if due, not yet written)
    write:N:K     inside the checkpoint write of step N, at its K-th file or folder sync (1 = after its first file;
                  the last ones fall after the rename into place, before or while ``latest`` is replaced)
    prune:N       while the checkpoint of step N deletes the checkpoints beyond ``keep_checkpoints``
    first-step    inside the first step of this process (after the forward pass, before the backward pass)

The line ``ready`` is printed when the imports are done and training starts, for a parent that kills the process
itself after a random delay.
"""

import argparse
import os
import signal

import torch

import latentdiff.train.checkpoint as ckpt
import latentdiff.train.loop as loop
from latentdiff.train import TrainConfig, train

from helpers.train_tiny import ToyImages, make_objective

CONFIG = dict(steps=20, batch_size=8, grad_accum=2, lr=3e-3, warmup_steps=3, lr_schedule="cosine", checkpoint_every=2,
              keep_checkpoints=2, log_every=1, ema_decay=0.9, deterministic=True, num_workers=0, seed=3)


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(moment: str, objective) -> None:
    """Patch the loop and the checkpoint writer so that this process dies at ``moment``."""
    kind, *nums = moment.split(":")
    nums = [int(n) for n in nums]
    if kind == "first-step":
        real_losses = objective.losses

        def losses(batch, step):
            out = real_losses(batch, step)
            _die()
            return out

        objective.losses = losses
        return
    current = {"step": None, "syncs": 0}
    real_save = ckpt.save_checkpoint

    def save_checkpoint(out_dir, step, **kw):
        current.update(step=step, syncs=0)
        return real_save(out_dir, step, **kw)

    loop.save_checkpoint = save_checkpoint
    if kind == "write":
        for name in ("_fsync_file", "_fsync_dir"):
            real = getattr(ckpt, name)

            def synced(path, real=real):
                real(path)
                if current["step"] == nums[0]:
                    current["syncs"] += 1
                    if current["syncs"] == nums[1]:
                        _die()

            setattr(ckpt, name, synced)
    elif kind == "prune":
        real_remove = ckpt._remove_tree

        def remove_tree(path):
            if current["step"] == nums[0]:
                os.replace(path, path.with_name(f".trash_{path.name}_{os.getpid()}"))  # renamed, not yet deleted
                _die()
            real_remove(path)

        ckpt._remove_tree = remove_tree
    elif kind != "step":
        raise SystemExit(f"unknown moment {moment!r}")


def serve() -> None:
    """Fork one run per line of stdin (see the module docstring)."""
    import sys

    torch.use_deterministic_algorithms(False)  # imports torch._dynamo (seconds) here, once, not in every run
    for line in sys.stdin:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the run
            code = 0
            try:
                main(line.split())
            except BaseException:
                import traceback

                traceback.print_exc(file=sys.stdout)
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill", default=None)
    args = ap.parse_args(argv)
    # Importance sampling (objective state), model dropout and label dropout (global RNG), accumulation, EMA.
    objective = make_objective(T=10, sampler="loss_second_moment", dropout=0.1, cond_drop_prob=0.3)
    if args.kill:
        _arm(args.kill, objective)
    kill_step = int(args.kill.split(":")[1]) if args.kill and args.kill.startswith("step:") else None

    def callback(step, metrics):
        if step == kill_step:
            _die()

    print("ready", flush=True)
    result = train(objective, ToyImages(n=36), TrainConfig(**CONFIG), args.out_dir, resume=args.resume,
                   callback=callback, progress=False)
    print(f"done step={result.step}", flush=True)


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    serve() if sys.argv[1:] == ["--serve"] else main()
