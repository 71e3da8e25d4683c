"""Choosing a torch device: the one asked for, else the best one this machine has."""

from __future__ import annotations

import torch


def default_device(name: str | None = None) -> torch.device:
    """``name`` if given, else the first of cuda, mps, cpu that is available."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
