"""TrainConfig: every setting of the training loop, validated; unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..strict import strict_from_dict

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    steps: int = 1000                     # optimizer steps in the whole run (not epochs)
    batch_size: int = 32                  # GLOBAL batch per optimizer step: summed over processes and accumulation
    lr: float = 1e-4                      # peak learning rate of AdamW (after warm-up)
    warmup_steps: int = 0                 # linear warm-up: step s uses lr·min(1, (s+1)/warmup_steps); 0 = none
    lr_schedule: str = "constant"         # after warm-up: "constant", "linear" or "cosine" decay to 0 at `steps`
    weight_decay: float = 0.0             # AdamW decoupled weight decay (all parameters)
    betas: tuple = (0.9, 0.999)           # AdamW (β1, β2)
    adam_eps: float = 1e-8                # AdamW ε
    grad_clip: float = 1.0                # clip the global grad norm of each optimizer to this; 0 = no clipping
    grad_accum: int = 1                   # micro-batches per optimizer step on each process
    ema_decay: float = 0.9999             # EMA decay of objective.ema models; 0 = keep no EMA
    ema_warmup: bool = True               # decay_n = min(ema_decay, (1+n)/(10+n)) for the n-th update
    mixed_precision: str = "auto"         # "auto" (bf16 on CUDA with bf16, else "no"), "no", "bf16", "fp16"
    seed: int = 0                         # seeds data order, torch/numpy/python RNGs (+ process index) and sample noise
    deterministic: bool = False           # torch.use_deterministic_algorithms; with num_workers=0 resumes bit-exact on CPU
    checkpoint_every: int = 1000          # write a checkpoint every N steps (and always at the end); 0 = only at the end
    keep_checkpoints: int = 3             # newest checkpoints kept; older ones deleted; 0 = keep all
    sample_every: int = 0                 # PNG grid of objective.sample_images every N steps; 0 = never
    sample_num: int = 16                  # images in each sample grid
    log_every: int = 10                   # average metrics over N steps, then write them (CSV, TensorBoard, bar)
    num_workers: int = 0                  # DataLoader worker processes (0 = load in the main process)
    find_unused_parameters: bool = False  # DDP: allow parameters that get no gradient in a step (e.g. GAN phases)
    max_minutes: float = 0.0              # wall-clock budget of this process's run: stop (with a checkpoint) before a step
                                          # would end past it; 0 = none. A resumed run gets the budget anew.

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        ints = ("steps", "batch_size", "warmup_steps", "grad_accum", "checkpoint_every", "keep_checkpoints",
                "sample_every", "sample_num", "log_every", "num_workers", "seed")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TrainConfig.{name} must be an int, got {v!r}")
        positive = ("steps", "batch_size", "grad_accum", "log_every", "sample_num")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "sample_every", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not (isinstance(self.max_minutes, (int, float)) and not isinstance(self.max_minutes, bool)
                and math.isfinite(self.max_minutes) and self.max_minutes >= 0):
            raise ValueError(f"TrainConfig.max_minutes must be a number >= 0 (0 = no limit), got {self.max_minutes!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.adam_eps <= 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0 and adam_eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; expected one of {', '.join(MIXED_PRECISION)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a plain dict (YAML/JSON); an unknown key is an error that names it."""
        return strict_from_dict(cls, d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


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

