"""Two switches that change how fast a network runs, never what it computes: ``torch.compile`` and channels-last.

- ``compile``: ``torch.compile`` (TorchDynamo captures the forward, the inductor backend fuses it into generated
  C++/OpenMP code on CPUs, Triton kernels on GPUs). The first call compiles (seconds to minutes) and every new input
  shape recompiles; :class:`FirstCallTimer` separates that cost from the steady state. ``backend="eager"`` traces
  without generating code (a quick check that a model compiles).
- ``channels_last``: weights (and so activations) in NHWC order, the layout tensor cores and oneDNN's convolutions
  prefer; convolution outputs follow the weights' layout.
"""

from __future__ import annotations

import time

import torch
from torch import nn

BACKENDS = ("inductor", "eager", "aot_eager")


def optimize(module: nn.Module, *, compile: bool = False, channels_last: bool = False,
             backend: str = "inductor") -> nn.Module:
    """``module`` (moved to channels-last in place when asked), wrapped by ``torch.compile`` when asked."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(module, backend=backend)
    return module


def unoptimized(module: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (the module itself when there is none)."""
    return getattr(module, "_orig_mod", module)


class FirstCallTimer:
    """Wall time of the first call (compilation included) apart from the calls after it."""

    def __init__(self):
        self.first_s: float | None = None
        self.rest_s, self.rest_calls = 0.0, 0

    def record(self, seconds: float) -> None:
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.rest_s += seconds
            self.rest_calls += 1

    def time(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.record(time.perf_counter() - t0)
        return out

    @property
    def steady_s(self) -> float | None:
        """Mean time of the calls after the first."""
        return self.rest_s / self.rest_calls if self.rest_calls else None

    @property
    def compile_s(self) -> float | None:
        """First call minus a steady call: the time spent compiling."""
        return None if self.first_s is None or self.steady_s is None else max(self.first_s - self.steady_s, 0.0)
