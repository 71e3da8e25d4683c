"""What a run writes besides checkpoints: metrics CSV, TensorBoard (when installed), sample grids."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] (C = 1, 3 or 4) -> one (rows·(H+p)+p, nrow·(W+p)+p, C) uint8 array."""
    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {shape}")
    n, c, h, w = images.shape
    if c not in (1, 3, 4) or n == 0:
        raise ValueError(f"images must have 1, 3 or 4 channels and at least one image, got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    x = images.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    fill = round((min(max(pad_value, -1.0), 1.0) + 1) * 127.5)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row (atomic write)."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


class MetricsLogger:
    """Rows of metrics to ``metrics.csv`` (one row per log step; new keys widen the header) and to
    TensorBoard under ``tb/`` when the ``tensorboard`` package is installed. Only the main process logs."""

    def __init__(self, out_dir, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict] = []
        self.fields: list[str] = []
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run writes them again)."""
        if not self.enabled or not self.path.is_file():
            return
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        self._write()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in metrics.items()}}
        new = [k for k in row if k not in self.fields]
        self.fields += new
        self.rows.append(row)
        if new or not self.path.is_file():
            self._write()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, images: torch.Tensor, step: int, nrow: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, make_grid(images, nrow=nrow), step, dataformats="HWC")

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fields)
        writer.writeheader()
        writer.writerows(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
