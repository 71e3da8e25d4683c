"""Exponential moving average of a model's weights (the EMA that DDPM samples from).

θ_ema ← d_n·θ_ema + (1 − d_n)·θ after each optimizer step, with the warm-up d_n = min(d, (1+n)/(10+n)) for the
n-th update (n = 0, 1, ...), so early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, num_updates: int, warmup: bool = True) -> float:
    """d_n of the n-th update (0-based): ``decay``, or min(decay, (1+n)/(10+n)) with ``warmup``."""
    if not warmup:
        return float(decay)
    n = int(num_updates)
    return float(min(decay, (1.0 + n) / (10.0 + n)))


class EMA:
    """An averaged copy of ``model`` (own parameters, eval mode, no gradients); buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Float parameters are averaged; anything else (integer buffers, counters) is copied.
        self._names = [n for n, p in self.model.named_parameters() if p.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``'s current weights; returns the decay used."""
        d = ema_decay(self.decay, self.num_updates, self.warmup)
        params = dict(model.named_parameters())
        ema_params = dict(self.model.named_parameters())
        if params.keys() != ema_params.keys():
            raise ValueError("EMA model and trained model have different parameter names")
        targets = [ema_params[n] for n in self._names]
        sources = [params[n].detach().to(ema_params[n].dtype) for n in self._names]
        if targets:
            torch._foreach_lerp_(targets, sources, 1.0 - d)  # θ_ema + (1−d)(θ − θ_ema) = d·θ_ema + (1−d)·θ
        for (_, b_ema), (_, b) in zip(self.model.named_buffers(), model.named_buffers()):
            b_ema.copy_(b)
        self.num_updates += 1
        return d

    def to(self, device) -> "EMA":
        self.model.to(device)
        return self
