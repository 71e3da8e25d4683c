"""LPIPS: the learned perceptual image patch similarity (Zhang et al. 2018), the perceptual term of the first stage.

d(x, y) = Σ_l  mean_{h,w} || w_l ⊙ (φ̂_l(x) − φ̂_l(y)) ||²,  where φ_l are the activations of a VGG-16 at the ends of
its five stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), φ̂ is φ normalised to unit length along the
channels, and w_l ≥ 0 are learned per-channel weights (1x1 convolutions without bias, "lin" layers). Inputs
in [-1, 1] are first shifted and scaled per channel by LPIPS' constants.

Weights are never downloaded: :func:`load_lpips` reads a local safetensors file. The file may carry the
stage widths/depths in its metadata (tests save tiny random nets); without them it is VGG-16.
:func:`convert_reference_lpips` maps the published tensors (VGG-16 ``features.N`` and LPIPS ``linK.model.1``
names, already loaded by the user) onto this module's names.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, MissingFileError

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_DEPTHS = (2, 2, 3, 3, 3)
# Index of each 3x3 convolution in torchvision's vgg16().features, stage by stage.
VGG16_FEATURE_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """Perceptual distance between image batches in [-1, 1]: forward(x, y) → (B,). Frozen, eval mode."""

    def __init__(self, widths=VGG16_WIDTHS, depths=VGG16_DEPTHS, in_channels: int = 3):
        super().__init__()
        widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
        if len(widths) != len(depths) or not widths or min(widths) < 1 or min(depths) < 1:
            raise ValueError(f"LPIPS: widths {widths} and depths {depths} must be equally long positive tuples")
        self.widths, self.depths = widths, depths
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.stages = nn.ModuleList()
        c = in_channels
        for w, d in zip(widths, depths):
            convs = nn.ModuleList()
            for _ in range(d):
                convs.append(nn.Conv2d(c, w, 3, padding=1))
                c = w
            self.stages.append(convs)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval (the reference uses dropout only while fitting the lins)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations at the end of each stage (max-pool 2x2 between stages)."""
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, convs in enumerate(self.stages):
            if i > 0:
                h = F.max_pool2d(h, 2)
            for conv in convs:
                h = F.relu(conv(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"LPIPS: inputs must be two (B, 3, H, W) batches of one shape, "
                             f"got {tuple(x.shape)}, {tuple(y.shape)}")
        d = 0.0
        for lin, fx, fy in zip(self.lins, self.features(x), self.features(y)):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((nx - ny).pow(2)).mean(dim=(1, 2, 3))  # (B,)
        return d


def save_lpips(model: LPIPS, path: str) -> None:
    """Write an LPIPS net (weights + widths/depths in the metadata) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "latentdiff-lpips", "widths": json.dumps(model.widths), "depths": json.dumps(model.depths)}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def load_lpips(path: str, map_location: str | torch.device = "cpu") -> LPIPS:
    """LPIPS from a local safetensors file (see module docstring); clear errors for missing/corrupt/mismatched files."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise MissingFileError(f"LPIPS weights not found: {path}")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(path, device=str(map_location))
        widths = tuple(json.loads(meta["widths"])) if "widths" in meta else VGG16_WIDTHS
        depths = tuple(json.loads(meta["depths"])) if "depths" in meta else VGG16_DEPTHS
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as e:
        raise CheckpointError(f"corrupt LPIPS weights {path}: {e}") from None
    model = LPIPS(widths, depths)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"LPIPS weights {path} do not fit the network: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    model.load_state_dict(state)
    return model.to(map_location)


def convert_reference_lpips(vgg_features: dict, lins: dict) -> dict:
    """State dict of :class:`LPIPS` (VGG-16) from the published tensors.

    vgg_features: torchvision vgg16 ``features.{i}.weight/bias`` (the ``features.`` prefix optional);
    lins: LPIPS ``lin{k}.model.1.weight`` (k = 0..4). The user loads both files (e.g. with
    ``torch.load(..., weights_only=True)``); this function only renames.
    """
    out = {}
    for s, indices in enumerate(VGG16_FEATURE_INDICES):
        for j, i in enumerate(indices):
            for kind in ("weight", "bias"):
                key = f"features.{i}.{kind}" if f"features.{i}.{kind}" in vgg_features else f"{i}.{kind}"
                if key not in vgg_features:
                    raise ValueError(f"convert_reference_lpips: VGG tensor {key!r} missing")
                out[f"stages.{s}.{j}.{kind}"] = vgg_features[key]
        key = f"lin{s}.model.1.weight"
        if key not in lins:
            raise ValueError(f"convert_reference_lpips: LPIPS tensor {key!r} missing")
        out[f"lins.{s}.weight"] = lins[key]
    return out
