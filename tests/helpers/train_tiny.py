"""Tiny stand-ins for the training tests: a conv denoiser with the UNet's forward signature, a toy dataset,
and a diffusion objective built from them. Imported by test_train.py and the train_*.py subprocess scripts."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from latentdiff.diffusion import GaussianDiffusion
from latentdiff.schedules import make_betas
from latentdiff.train import DiffusionObjective


class TinyDenoiser(nn.Module):
    """forward(x, t, *, y=None, context=None, concat=None) like the UNet; a few convs with a timestep and
    class embedding (class id num_classes = the null class)."""

    def __init__(self, channels: int = 1, width: int = 16, num_classes: int | None = None, T: int = 1000,
                 dropout: float = 0.0):
        super().__init__()
        self.T = T
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.t_emb = nn.Linear(8, width)
        self.y_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, *, y=None, context=None, concat=None):
        freqs = torch.arange(4, device=x.device, dtype=torch.float32)
        ang = t.float()[:, None] / self.T * math.pi * (2.0 ** freqs)[None]  # (B, 4)
        emb = self.t_emb(torch.cat([ang.sin(), ang.cos()], dim=1))  # (B, width)
        if self.y_emb is not None and y is not None:
            emb = emb + self.y_emb(y)
        h = torch.nn.functional.silu(self.inp(x) + emb[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(self.drop(h)))
        return self.out(h)


class ToyImages(Dataset):
    """``n`` images (C, size, size) in [-1, 1]: one fixed pattern per class plus a little noise; label = class."""

    def __init__(self, n: int = 64, size: int = 8, channels: int = 1, num_classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.templates = torch.rand(num_classes, channels, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = 0.05 * torch.randn(n, channels, size, size, generator=g)
        self.images = (self.templates[self.labels] + noise).clamp(-1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


def make_objective(*, T: int = 50, num_classes: int = 4, cond_drop_prob: float = 0.2, sampler: str = "uniform",
                   dropout: float = 0.0, seed: int = 0) -> DiffusionObjective:
    torch.manual_seed(seed)
    model = TinyDenoiser(num_classes=num_classes, T=T, dropout=dropout)
    diffusion = GaussianDiffusion(make_betas("cosine", T), timestep_sampler=sampler)
    return DiffusionObjective(model, diffusion, cond_key="label", num_classes=num_classes,
                              cond_drop_prob=cond_drop_prob)
