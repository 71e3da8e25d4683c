"""Networks built on the meta device (no memory, no initialisation cost beyond the module tree), cached per config:
the key maps and shape checks read their names and shapes; loading builds a fresh one to assign tensors into."""

from __future__ import annotations

import json

import torch

_CACHE: dict[tuple, torch.nn.Module] = {}


def meta_model(cls, config) -> torch.nn.Module:
    """A read-only ``cls(config)`` on the meta device, built once per (class, config)."""
    key = (cls.__qualname__, json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key not in _CACHE:
        if len(_CACHE) > 16:
            _CACHE.clear()
        with torch.device("meta"):
            _CACHE[key] = cls(config)
    return _CACHE[key]
