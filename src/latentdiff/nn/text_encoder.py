"""The text encoder τ_θ of LDM's text-to-image model, trained from scratch jointly with the U-Net.

Rombach et al. 2022, sec. 3.3 and 4.3.1: τ_θ maps the tokenized prompt y to a sequence τ_θ(y) ∈ ℝ^{L×D} that
the U-Net's spatial transformers attend to (K and V come from it). LDM's τ_θ is a BERT-style transformer
(x-transformers' encoder over a BERT tokenizer); ours is the same kind of network, sized for a CPU:

    h_0 = E[tokens] + P[:L]                                         token + learned positional embedding
    h_i = h_{i-1} + Attn(LN(h_{i-1}));  h_i = h_i + MLP(LN(h_i))     ``depth`` pre-LayerNorm layers
    τ_θ(y) = LN(h_depth)                                            (B, L, width)

Self-attention goes through ``torch.nn.functional.scaled_dot_product_attention`` with a key padding mask: no
position attends to a <pad> token (id 0), so an output at a real token does not depend on how much padding
follows; the <end> token is a real token and is attended (for the empty prompt it is the only one). The
outputs at pad positions are still computed (from the real tokens) and the U-Net cross-attends to all L
positions, as Stable Diffusion does with its padded CLIP context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dataclass_io import FromDict
from .tokenizer import PAD_ID


@dataclass
class TextEncoderConfig(FromDict):
    vocab_size: int  # rows of the token embedding: the tokenizer's vocabulary, special tokens included
    context_length: int  # L: tokens per prompt (end token included) = learned positional embeddings
    width: int = 64  # D, the width of every token; the U-Net's context_dim
    depth: int = 2  # transformer layers (LDM's 1.45B text model: 32; a CPU model needs 2)
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: int = 4  # feed-forward hidden width = mlp_ratio * width (the transformer's usual 4)
    dropout: float = 0.0  # dropout after attention and feed-forward; 0 = none (LDM's small models use none)
    alibi: bool = False  # add ALiBi's distance penalty −m_h·|i − j| to the attention scores (Press et al. 2022):
    #                     heads start local, so words bind to their neighbours ("red circle" to "at the top left")

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "width", "depth", "heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"TextEncoderConfig: width={self.width} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextEncoderConfig.dropout must be in [0, 1), got {self.dropout}")



class TransformerLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + Attn(LN(x)), then x + MLP(LN(x)) (Vaswani et al. 2017; GPT-2 order)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D); keep: (B, 1, 1, L) bool, True for the keys every query may attend to, or an additive float
        bias (B, heads, L, L) with −inf at the keys no query may attend to."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d_head)
        p = self.dropout_p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (B, heads, L, d_head)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class TextEncoder(nn.Module):
    """τ_θ: forward(tokens (B, L) long, L <= context_length) -> (B, L, width); see the module docstring."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"TextEncoder expects a TextEncoderConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.layers = nn.ModuleList(
            TransformerLayer(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # GPT-2 / CLIP initialisation
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (B, L) long tensor of token ids, got {got}")
        b, n = tokens.shape
        if not 1 <= n <= cfg.context_length:
            raise ValueError(f"tokens have length {n}; this text encoder takes 1..{cfg.context_length} positions")
        # Range check on CPU only: on an accelerator it would force a device sync every call.
        if tokens.device.type == "cpu" and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size - 1}] (the vocabulary), got [{lo}, {hi}]")
        h = self.token_embedding(tokens) + self.positional_embedding[:n]  # (B, L, D)
        keep = tokens != PAD_ID
        keep[:, 0] = True  # a row of pads alone (never made by the tokenizer) would leave softmax nothing to weigh
        keep = keep[:, None, None, :]  # (B, 1, 1, L): the same key mask for every head and query
        if cfg.alibi:
            keep = alibi_bias(cfg.heads, n, h.device, h.dtype).masked_fill(~keep, float("-inf"))  # (B, heads, L, L)
        for layer in self.layers:
            h = layer(h, keep)
        return self.final_norm(h)


def alibi_bias(heads: int, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, heads, L, L) additive attention bias −m_h·|i − j| of ALiBi (Press et al. 2022), symmetric for an
    encoder; the slopes m_h = 2^(−8h/H), h = 1..H, form ALiBi's geometric sequence."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device, dtype=torch.float64) / heads)
    pos = torch.arange(length, device=device)
    distance = (pos[None, :] - pos[:, None]).abs().to(torch.float64)  # (L, L)
    return (-slopes[:, None, None] * distance)[None].to(dtype)
