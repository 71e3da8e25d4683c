"""Patch discriminator of the autoencoder's adversarial term (Isola et al. 2017, PatchGAN; used by VQGAN and LDM).

A fully convolutional net that scores overlapping patches of an image as real or fake: a 4x4 stride-2
convolution with LeakyReLU(0.2), ``n_layers − 1`` more stride-2 blocks (conv, norm, LeakyReLU) doubling the
width up to 8·ndf, one stride-1 block, and a 4x4 stride-1 convolution to one logit per patch. The receptive
field grows with ``n_layers`` (3 layers: 70x70 pixels); for 32x32 images use 2 or 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3    # image channels
    ndf: int = 64           # width of the first layer; doubled per layer up to 8·ndf
    n_layers: int = 3       # stride-2 layers (each halves the resolution)
    norm: str = "batch"     # "batch" (pix2pix/VQGAN), "group" (batch-size independent) or "none"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {self.norm!r}; expected one of {', '.join(NORMS)}")
        for name in ("in_channels", "ndf", "n_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"discriminator {name} must be a positive int, got {v!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) in [-1, 1] → patch logits (B, 1, h, w)."""

    def __init__(self, config: DiscriminatorConfig | None = None, **overrides):
        super().__init__()
        cfg = config or DiscriminatorConfig(**overrides)
        if config is not None and overrides:
            raise ValueError("PatchDiscriminator: pass a config or keyword overrides, not both")
        self.config = cfg
        nf = cfg.ndf
        bias = cfg.norm == "none"  # a following norm makes the conv bias redundant
        layers = [nn.Conv2d(cfg.in_channels, nf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(nf * prev, nf * mult, 4, stride=stride, padding=1, bias=bias),
                       _norm(cfg.norm, nf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(nf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """DCGAN initialisation: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"discriminator expects (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        return self.main(x)
