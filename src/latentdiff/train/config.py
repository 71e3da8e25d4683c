"""The training loop's settings and its learning-rate schedule.

:class:`TrainConfig` is the one class of :mod:`latentdiff.config` (the ``train`` section of a config file),
re-exported here for the loop; ``TrainConfig.from_dict`` is the strict builder from plain data.
"""

from __future__ import annotations

import math

from ..config import TrainConfig  # noqa: F401  (re-exported: the loop and its users import it from here)


def lr_factor(step: int, *, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up to 1 over
    ``warmup_steps`` steps, then constant or a linear/cosine decay that reaches 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")

