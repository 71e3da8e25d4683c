"""Attention layers of the U-Net: pixel self-attention (DDPM / ADM) and the spatial transformer (LDM).

Both treat the H·W positions of a feature map as tokens and go through
``torch.nn.functional.scaled_dot_product_attention`` (softmax(q kᵀ/√d) v; Vaswani et al. 2017, eq. 1), which
picks a fused kernel (flash / memory-efficient) on every device.

Layouts follow the published checkpoints so that they load by renaming keys alone:
- ``AttentionBlock``: GroupNorm, one qkv projection (3C outputs; a 1x1 conv in CompVis/OpenAI, a Linear here:
  same numbers, squeezed kernel), the "legacy" channel order [head, (q, k, v), head_dim] of those checkpoints,
  zero-initialised output projection, residual.
- ``SpatialTransformer`` (Rombach et al. 2022, section 3.3): GroupNorm (eps 1e-6), proj_in (1x1 conv as in
  SD 1.x, or Linear as in SD 2.x), ``depth`` transformer blocks (pre-LayerNorm self-attention, cross-attention
  to the context, GEGLU feed-forward of width 4C), zero-initialised proj_out, residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm, zero_module


def _heads_of(channels: int, num_heads: int, head_channels: int) -> tuple[int, int]:
    """(heads, head_dim) from a head count or, when ``head_channels`` != -1, from channels per head."""
    if head_channels != -1:
        if head_channels <= 0 or channels % head_channels:
            raise ValueError(f"attention: {channels} channels are not divisible by head_channels={head_channels}")
        return channels // head_channels, head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"attention: {channels} channels are not divisible by num_heads={num_heads}")
    return num_heads, channels // num_heads


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions with a residual connection (DDPM appendix B, ADM).

    forward(x): (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int = -1, num_groups: int = 32):
        super().__init__()
        self.heads, self.head_dim = _heads_of(channels, num_heads, head_channels)
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a view when x is channels_last
        qkv = self.qkv(tokens).view(b, h * w, self.heads, 3, self.head_dim)  # legacy order [head, qkv, d]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj_out(out.transpose(1, 2).reshape(b, h * w, c))  # (B, HW, C)
        return x + out.transpose(1, 2).view(b, c, h, w)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from x to keys/values from ``context`` (x itself when None).

    forward(x (B, N, query_dim), context (B, L, context_dim) or None) -> (B, N, query_dim).
    q, k, v projections without bias, output projection with bias (the LDM / Stable Diffusion layout).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N, heads*d)
        return self.dropout(self.to_out(out))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a·GELU(g) with [a, g] = x W + b."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to ``mult``·dim, dropout, Linear back to dim."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.geglu = GEGLU(dim, mult * dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.dropout(self.geglu(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += FF(LN x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, head_dim, None, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H·W positions of a feature map, cross-attending to a context (LDM section 3.3).

    forward(x (B, C, H, W), context (B, L, context_dim) or None) -> (B, C, H, W). Without ``context_dim`` the
    second attention is self-attention too.
    """

    def __init__(
        self,
        channels: int,  # width C of the feature map
        num_heads: int = 8,  # head count (used when head_channels == -1)
        head_channels: int = -1,  # channels per head (SD 2.x: 64), -1 for "use num_heads"
        depth: int = 1,  # number of transformer blocks
        context_dim: int | None = None,  # width of the context tokens (None: no cross-attention)
        dropout: float = 0.0,  # dropout in attention outputs and feed-forward
        use_linear_proj: bool = False,  # proj_in/proj_out as Linear (SD 2.x) instead of 1x1 conv (SD 1.x)
        num_groups: int = 32,  # GroupNorm groups
    ):
        super().__init__()
        heads, head_dim = _heads_of(channels, num_heads, head_channels)
        inner = heads * head_dim
        self.use_linear_proj = use_linear_proj
        self.norm = group_norm(channels, num_groups, eps=1e-6)
        if use_linear_proj:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = zero_module(nn.Linear(inner, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        z = self.norm(x)
        if not self.use_linear_proj:
            z = self.proj_in(z)
        z = z.flatten(2).transpose(1, 2)  # (B, HW, inner)
        if self.use_linear_proj:
            z = self.proj_in(z)
        for block in self.blocks:
            z = block(z, context)
        if self.use_linear_proj:
            z = self.proj_out(z)
        z = z.transpose(1, 2).reshape(b, -1, h, w)  # (B, inner or C, H, W)
        if not self.use_linear_proj:
            z = self.proj_out(z)
        return x + z
