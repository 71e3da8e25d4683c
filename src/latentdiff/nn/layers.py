"""Building blocks of the U-Net: timestep embedding, GroupNorm(+SiLU), residual block, down/upsampling.

The residual block is the one of Ho et al. 2020 (appendix B) as refined by Dhariwal & Nichol 2021 ("ADM"):
GroupNorm, SiLU, 3x3 conv; the timestep embedding enters by addition or, with ``use_scale_shift_norm``,
by adaptive group normalisation  AdaGN(h, e) = GroupNorm(h)·(1 + e_s) + e_b  (ADM, section 3); GroupNorm,
SiLU, dropout and a zero-initialised 3x3 conv; a 1x1 conv on the skip path when the width changes.

Speed and memory (CPU float32 is the baseline):
- ``group_norm_silu`` fuses GroupNorm, the optional AdaGN modulation and SiLU into one autograd node that
  keeps only its input (and the per-group mean / 1/std) for the backward pass and recomputes the normalised
  tensor there. Unfused, autograd keeps the normalised tensor as well: one full activation per norm.
- The sinusoid frequencies are a buffer, computed once.
- In-place additions are used only on tensors that no autograd node has saved (fresh conv outputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` and return it (output layers start at zero: ADM, DiT)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


NORMS = ("group", "pixel")  # a network's ``norm``: GroupNorm, or PixelNorm (what group_norm builds for groups None)


def group_norm(channels: int, num_groups: int | None, eps: float = 1e-5) -> nn.Module:
    """``nn.GroupNorm`` with a clear error when ``channels`` is not divisible by ``num_groups``; with
    ``num_groups`` None a :class:`PixelNorm` (a network's ``norm: pixel``)."""
    if num_groups is None:
        return PixelNorm(channels, eps=eps)
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm: {channels} channels are not divisible by num_groups={num_groups}; "
            "choose num_groups dividing every width of the network"
        )
    return nn.GroupNorm(num_groups, channels, eps=eps)


class PixelNorm(nn.Module):
    """(x − μ) / sqrt(σ² + ε) · γ + β with μ, σ² the mean and variance over the channels at each position: a
    LayerNorm of every pixel's feature vector (ConvNeXt's channels-first LayerNorm). ``weight``/``bias`` are
    shaped as GroupNorm's."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused layer_norm over the last axis of the channels-last view (faster than the mean / var ops).
        h = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return h.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# GroupNorm (+ AdaGN modulation) + SiLU, fused


class _GroupNormSiLU(torch.autograd.Function):
    """y = SiLU(GroupNorm(x)·(1 + scale) + shift); saves x, mean, 1/std; recomputes GroupNorm(x) in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float):
        n, c = x.shape[:2]
        hw = x.numel() // max(n * c, 1)
        a, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        y = a if scale is None else a.mul_(scale + 1).add_(shift)  # AdaGN (ADM eq. in section 3)
        y = F.silu(y, inplace=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, scale, shift)
        ctx.shape_info = (n, c, hw, groups, eps)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, mean, rstd, scale, shift = ctx.saved_tensors
        n, c, hw, groups, eps = ctx.shape_info
        a = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)[0]  # recomputed GroupNorm(x)
        m = a if scale is None else a * (scale + 1) + shift
        dm = torch.ops.aten.silu_backward(dy, m)  # dL/d(pre-activation)
        d_scale = d_shift = None
        if scale is not None:
            d_shift = dm.sum((2, 3), keepdim=True) if ctx.needs_input_grad[4] else None  # (B, C, 1, 1)
            d_scale = (dm * a).sum((2, 3), keepdim=True) if ctx.needs_input_grad[3] else None
            dm = dm * (scale + 1)
        dm = dm.contiguous(memory_format=_memory_format(x))
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(dm, x, mean, rstd, weight, n, c, hw, groups, mask)
        return dx, dw, db, d_scale, d_shift, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_silu(
    x: torch.Tensor, norm: nn.Module, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(norm(x)·(1 + scale) + shift) for x (B, C, H, W); scale, shift (B, C, 1, 1) or None.

    Uses the fused autograd node above for a GroupNorm in float32/float64 outside autocast; otherwise (a
    PixelNorm, autocast, half precision) the plain sequence of ops, which autocast runs in float32 where it should.
    """
    fused = (
        isinstance(norm, nn.GroupNorm)
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and norm.weight is not None
        and not torch.is_autocast_enabled(x.device.type)
    )
    if fused:
        x = x.contiguous(memory_format=_memory_format(x))
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps)
    h = norm(x)
    if scale is not None:
        h = h * (scale + 1) + shift
    return F.silu(h)


# --------------------------------------------------------------------------------------------------------------
# Timestep embedding


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoid of the timestep (DDPM appendix B): [cos(t·ω_k), sin(t·ω_k)], ω_k = P^(-k/half).

    Cosines first, then sines (the OpenAI / CompVis order), P = ``max_period`` = 10000, k = 0..half-1 with
    half = dim // 2; an odd ``dim`` gets a zero last column. t may be fractional (Karras grids).
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        # Frequencies ω_k computed once (float64, stored float32); not saved in checkpoints.
        self.register_buffer("freqs", self._freqs(torch.device("cpu")), persistent=False)

    def _freqs(self, device) -> torch.Tensor:
        half = self.dim // 2
        k = torch.arange(half, dtype=torch.float64, device=device)
        return torch.exp(-math.log(self.max_period) * k / half).float()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs
        if freqs.dtype != torch.float32:  # the module was cast to half precision: keep full-precision ω_k
            freqs = self._freqs(freqs.device)
        args = t.to(torch.float32)[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


# --------------------------------------------------------------------------------------------------------------
# Resampling


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (``use_conv``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("Downsample without conv cannot change the number of channels")
            self.op = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv (``use_conv``)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without conv cannot change the number of channels")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


# --------------------------------------------------------------------------------------------------------------
# Residual block


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (DDPM appendix B; ADM's AdaGN and up/down variants).

    forward(x, emb): x (B, in_channels, H, W); ``emb`` is SiLU(timestep [+ class] embedding), (B, emb_dim):
    the U-Net applies that SiLU once for all blocks instead of once per block (same function).
    Returns (B, out_channels, H', W') with H' = 2H / H / H/2 for up / plain / down.
    """

    def __init__(
        self,
        channels: int,  # input width
        emb_dim: int,  # width of the timestep embedding
        out_channels: int | None = None,  # output width (None: same as input)
        dropout: float = 0.0,  # dropout before the last conv
        use_scale_shift_norm: bool = False,  # AdaGN (scale and shift from emb) instead of adding emb
        up: bool = False,  # upsample inside the block (ADM's resblock_updown)
        down: bool = False,  # downsample inside the block
        num_groups: int = 32,  # GroupNorm groups
    ):
        super().__init__()
        out_channels = out_channels or channels
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(channels, num_groups)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        # Resampling of both paths between norm1+SiLU and conv1 (no parameters: ADM uses conv-free ops here).
        self.resample = None
        if up or down:
            self.resample = Upsample(channels, use_conv=False) if up else Downsample(channels, use_conv=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = group_norm_silu(x, self.norm1)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        e = self.emb_proj(emb)[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = group_norm_silu(h, self.norm2, scale, shift)
        else:
            h = group_norm_silu(h.add_(e), self.norm2)  # conv1's output is not saved by autograd: in place is safe
        h = self.conv2(self.dropout(h))
        return h.add_(self.skip(x))  # conv2's output is fresh: add the skip path in place
