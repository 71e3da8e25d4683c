"""Data-parallel check, launched by test_train.py as

    python -m torch.distributed.run --nproc_per_node 2 -m helpers.train_ddp_script OUT_DIR   # tests/ on PYTHONPATH

or imported and run in one process (``run_regression``). The regression objective has no randomness and a
mean loss, so 2 processes × batch B must update the weights as 1 process × batch 2B does (up to float error).
A second short run trains a DiffusionObjective with importance sampling, whose loss history is all-gathered:
every process must end with the same history.
"""

import os
import sys

import torch
from torch import nn
from torch.utils.data import Dataset

from latentdiff.train import TrainConfig, train

CONFIG = dict(steps=3, batch_size=8, lr=1e-2, warmup_steps=2, grad_clip=0.5, checkpoint_every=0, log_every=1,
              ema_decay=0.5, seed=0, deterministic=True)


class Pairs(Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Regression:
    """models/optimizers/ema/losses as the loop expects; loss = mean squared error over the batch."""

    def __init__(self):
        torch.manual_seed(0)
        self.models = {"net": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))}
        self.optimizers = {"model": ["net"]}
        self.ema = ["net"]

    def losses(self, batch, step):
        pred = self.models["net"](batch["x"])
        loss = ((pred - batch["y"]) ** 2).mean()
        return {"model": loss}, {}


def run_regression(out_dir, **overrides):
    obj = Regression()
    train(obj, Pairs(), TrainConfig(**{**CONFIG, **overrides}), out_dir, progress=False)
    return obj


def main(out_dir):
    import torch.distributed as dist

    from helpers.train_tiny import ToyImages, make_objective

    run_regression(os.path.join(out_dir, "regression"))
    obj = make_objective(T=10, sampler="loss_second_moment")
    config = TrainConfig(steps=2, batch_size=8, checkpoint_every=0, log_every=1)
    train(obj, ToyImages(n=32), config, os.path.join(out_dir, "diffusion"), progress=False)
    counts = obj.diffusion.timestep_sampler.counts
    gathered = [torch.zeros(len(counts), dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.as_tensor(counts))
    if dist.get_rank() == 0:
        total = int(gathered[0].sum())
        assert total == 2 * 8, f"history holds {total} losses, expected 16 (all processes)"
        assert all(torch.equal(gathered[0], c) for c in gathered), "timestep samplers differ between processes"
        print(f"ddp ok: world={dist.get_world_size()}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
