"""The layout encoder τ_θ of LDM's layout-to-image models: a sequence of box tokens through a small transformer.

Rombach et al. 2022, sec. 4.3.1 and appendix: the COCO / OpenImages layout models cross-attend to a transformer
encoding of the layout, tokenized as in the CompVis box tokenizers (taming-transformers' coordinates-as-tokens):
each object becomes three tokens,

    class              1 + c,                      c = the object's class (shapes: shape x colour)
    top-left corner    1 + C + (y0_q·S + x0_q)     x_q = min(⌊x·S⌋, S − 1): a cell of an S x S grid
    bottom-right       1 + C + (y1_q·S + x1_q)

and the objects (sorted in reading order of their top-left corners, so the order they are given in does not
matter) are padded to ``max_objects`` with the "none" token 0. The vocabulary is 1 + C + S² tokens.

The encoder is the text encoder's transformer (nn/text_encoder.py: token + learned positional embeddings,
pre-LayerNorm layers): token 0 is its pad id, so no position attends to a "none" token, and the empty layout
(all "none": the null condition of classifier-free guidance) leaves only its first position attended.

The S² corner embeddings start as Fourier features of their cell, [sin, cos](π·k·(x + ½) / S) and the same of y for
``width / 4`` frequencies k (Vaswani et al.'s sinusoids, in two dimensions), then learn freely: neighbouring
corners start alike, so a corner seen rarely in training still lands near its neighbours (a randomly initialised
table of 1,024 corners learns each on its own and needs far more steps).

A layout tensor is (B, K, 5) float: per object [class, x0, y0, x1, y1] with the box in [0, 1] (x right, y down);
a class of −1 marks an empty slot. K may be smaller than ``max_objects``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..dataclass_io import FromDict
from .text_encoder import TextEncoder, TextEncoderConfig

NONE_TOKEN = 0  # the "none" object token; also the transformer's pad id (never attended)


@dataclass
class LayoutEncoderConfig(FromDict):
    num_classes: int  # C: object classes (shapes: shapes x colours)
    max_objects: int = 3  # K: objects per layout; the sequence has 3K tokens
    grid: int = 32  # S: corners are cells of an S x S grid (LDM / CompVis: 32)
    width: int = 64  # token width; the U-Net's context_dim
    depth: int = 2  # transformer layers
    heads: int = 4  # attention heads; must divide width
    class_factors: tuple | None = None  # (A, B) with A·B = num_classes: class c = a·B + b is a pair of attributes
    #                                     (shapes: (3, 7), shape x colour); class embeddings start as e_a + e_b

    def __post_init__(self):
        for name in ("num_classes", "max_objects", "grid", "width", "depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LayoutEncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"LayoutEncoderConfig: width={self.width} is not divisible by heads={self.heads}")
        if self.class_factors is not None:
            f = tuple(self.class_factors)
            if (len(f) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in f)
                    or f[0] * f[1] != self.num_classes):
                raise ValueError(f"LayoutEncoderConfig.class_factors must be two positive integers whose product is "
                                 f"num_classes={self.num_classes}, got {self.class_factors!r}")
            self.class_factors = f

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_classes + self.grid * self.grid

    @property
    def context_length(self) -> int:
        return 3 * self.max_objects


def corner_token(x: torch.Tensor, y: torch.Tensor, grid: int) -> torch.Tensor:
    """y_q·S + x_q of points in [0, 1]² (x_q = min(⌊x·S⌋, S − 1)), as long."""
    xq = (x * grid).floor().clamp(0, grid - 1).long()
    yq = (y * grid).floor().clamp(0, grid - 1).long()
    return yq * grid + xq


def layout_tokens(layout: torch.Tensor, config: LayoutEncoderConfig) -> torch.Tensor:
    """(B, K, 5) layouts -> (B, 3·max_objects) long tokens (see the module docstring). Trusts its input: the
    values are checked where a user's layout enters (latentdiff.layouts)."""
    b, k = layout.shape[:2]
    c, s = config.num_classes, config.grid
    cls = layout[..., 0].round().long()  # (B, K); -1 = empty slot
    present = cls >= 0
    tl = corner_token(layout[..., 1], layout[..., 2], s)
    br = corner_token(layout[..., 3], layout[..., 4], s)
    # Reading order of the top-left corners, empty slots last.
    key = torch.where(present, tl, torch.full_like(tl, s * s))
    order = key.argsort(dim=1, stable=True)
    cls, tl, br, present = (v.gather(1, order) for v in (cls, tl, br, present))
    triple = torch.stack([1 + cls, 1 + c + tl, 1 + c + br], dim=-1)  # (B, K, 3)
    triple = torch.where(present[..., None], triple, torch.full_like(triple, NONE_TOKEN))
    tokens = torch.full((b, config.context_length), NONE_TOKEN, dtype=torch.long, device=layout.device)
    tokens[:, : 3 * k] = triple.reshape(b, 3 * k)
    return tokens


def corner_features(grid: int, width: int, scale: float = 0.5) -> torch.Tensor:
    """(S², width) initial corner embeddings: row y·S + x holds [sin, cos](π·k·(x + ½)/S) for k = 1..F, then the
    same of y (F = width // 4), zeros in any remaining columns; times ``scale``."""
    f = width // 4
    pos = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # cell centres in (0, 1)
    angles = torch.pi * pos[:, None] * torch.arange(1, f + 1, dtype=torch.float64)  # (S, F)
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (S, 2F)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # token y·S + x
    table = torch.zeros(grid * grid, width, dtype=torch.float64)
    table[:, : 4 * f] = torch.cat([one_axis[xs.reshape(-1)], one_axis[ys.reshape(-1)]], dim=1)
    return (scale * table).float()


def factored_class_embeddings(a: int, b: int, width: int, std: float = 0.02) -> torch.Tensor:
    """(a·b, width) initial class embeddings e_i + f_j for class i·b + j, with e, f drawn N(0, std²/2) (so a row has
    the token table's std): classes that share an attribute (a colour, a shape) start alike, and what one class
    learns of its colour starts out shared by the others of that colour."""
    e = torch.randn(a, 1, width) * (std / 2**0.5)
    f = torch.randn(1, b, width) * (std / 2**0.5)
    return (e + f).reshape(a * b, width)


class LayoutEncoder(nn.Module):
    """τ_θ: forward(layout (B, K, 5) float, K <= max_objects) -> (B, 3·max_objects, width)."""

    def __init__(self, config: LayoutEncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.transformer = TextEncoder(TextEncoderConfig(vocab_size=cfg.vocab_size, context_length=cfg.context_length,
                                                         width=cfg.width, depth=cfg.depth, heads=cfg.heads))
        with torch.no_grad():
            table = self.transformer.token_embedding.weight
            table[1 + cfg.num_classes:] = corner_features(cfg.grid, cfg.width)
            if cfg.class_factors is not None:
                table[1:1 + cfg.num_classes] = factored_class_embeddings(*cfg.class_factors, cfg.width)

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        k = self.config.max_objects
        if not torch.is_tensor(layout) or layout.dim() != 3 or layout.shape[-1] != 5 or layout.shape[1] > k:
            got = tuple(layout.shape) if torch.is_tensor(layout) else type(layout).__name__
            raise ValueError(f"a layout batch must be (B, K <= {k}, 5) [class, x0, y0, x1, y1], got {got}")
        return self.transformer(layout_tokens(layout, self.config))
