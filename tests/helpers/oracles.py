"""Stand-in shapes oracles for tests: a rule reader of the cells (no training), and a tiny ShapesOracle whose
features come from its untrained network and whose cell reading is the rule's."""

import torch
from torch import nn

from latentdiff.data.shapes import COLOURS, GRID, ShapesConfig
from latentdiff.eval.shapes_oracle import ShapesOracle, ShapesOracleConfig


def rule_cell_logits(x: torch.Tensor, config: ShapesConfig, palette: torch.Tensor) -> torch.Tensor:
    """One-hot cell logits (B, 9, 1 + K) read by rule, knowing nothing of the targets: the nearest palette colour
    of the pixels close to one, and the shape from the share of its bounding box the object fills (square ~1,
    circle ~pi/4, triangle ~1/2)."""
    B, _, H, W = x.shape
    rgb = ((x + 1) * 127.5).permute(0, 2, 3, 1).reshape(B, H * W, 3)
    dist, colour = torch.cdist(rgb, palette[None].expand(B, -1, -1)).min(-1)
    on, colour = (dist < 40).reshape(B, H, W), colour.reshape(B, H, W)
    out = torch.zeros(B, GRID * GRID, 1 + config.num_classes)
    out[..., 0] = 1.0
    for b in range(B):
        for cell in range(GRID * GRID):
            r, c = divmod(cell, GRID)
            window = (slice(r * H // GRID, (r + 1) * H // GRID), slice(c * W // GRID, (c + 1) * W // GRID))
            m = on[b][window]
            if m.sum() < 4:
                continue
            rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
            fill = float(m.sum()) / float((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            name = config.colours[int(colour[b][window][m].mode().values)]
            out[b, cell, 0] = 0.0
            out[b, cell, 1 + config.class_id(shape, name)] = 1.0
    return out


class RuleOracle(nn.Module):
    """Reads each cell by rule (``rule_cell_logits``); it has no features."""

    def __init__(self, config: ShapesConfig):
        super().__init__()
        self.cfg = config
        self.register_buffer("palette", torch.tensor([COLOURS[c] for c in config.colours], dtype=torch.float32))
        self.num_classes = config.num_classes

    def cell_logits(self, x):
        return rule_cell_logits(x, self.cfg, self.palette)


class RuleShapesOracle(ShapesOracle):
    """A tiny untrained ShapesOracle (features, fingerprint, saving) that reads cells by rule."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        super().__init__(ShapesOracleConfig(widths=(4, 4, 4), cell_dim=8))
        self.world = ShapesConfig()
        palette = torch.tensor([COLOURS[c] for c in self.world.colours], dtype=torch.float32)
        self.register_buffer("palette", palette, persistent=False)  # saved, it loads as a plain ShapesOracle
        self.eval()

    def cell_logits(self, x):
        return rule_cell_logits(x, self.world, self.palette.to(x.device))
