"""The shapes oracle: a small network that reads back the objects of a shapes image (shape, colour, grid cell).

Every shapes scene places at most one object in each cell of a 3x3 grid (data/shapes.py), so the oracle
classifies each cell independently: the image is resized to 36x36, cut into its nine 12x12 cells, and one
shared CNN maps each cell to ``1 + num_shapes·num_colours`` logits (0 = empty, 1 + class otherwise). This
is the per-cell target ``cells`` of the dataset, so the oracle can check a generated image against the
scene its prompt asked for.

Interface (as the digits oracle, latentdiff.eval.oracle, and the FID feature networks):
    cell_logits(x) (B, 9, 1 + K)          per-cell logits
    logits(x) (B, K)                       log Σ_cells p_cell(class): for a single-object image its class
    features(x) (B, 9·cell_dim)            concatenated cell embeddings (position-aware), for FID/KID
    features_and_logits(x), read_cells(x) (B, 9) predicted targets, describe(x) -> captions,
    num_classes, feature_dim, input_size, fingerprint().
x: (B, 3, H, W) in [-1, 1], any size.

Accuracy (printed by ``python -m latentdiff.eval.shapes_oracle OUT_DIR``) is measured on the test split of
the shapes world, whose layouts never occur in training: ``image_accuracy`` counts an image as right only if
all nine cells are right (every object's shape, colour and position, and no extra object).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.shapes import COLOURS, GRID, POSITIONS, SHAPES, ShapesDataset
from ..dataclass_io import FromDict
from .oracle import load_network, save_network

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
CELL = 12  # pixels per cell side after resizing to GRID·CELL = 36


@dataclass
class ShapesOracleConfig(FromDict):
    shapes: tuple = SHAPES            # shape names, in the class order of the dataset it was trained on
    colours: tuple = tuple(COLOURS)   # colour names, likewise
    widths: tuple = (16, 32, 64)      # conv widths: two convs at 12x12, (2x avg-pool) one at 6x6, (pool) 3x3
    cell_dim: int = 64                # cell embedding width; features are 9·cell_dim wide

    def __post_init__(self):
        self.shapes, self.colours = tuple(self.shapes), tuple(self.colours)
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or min(self.widths) < 1 or self.cell_dim < 1:
            raise ValueError(f"invalid ShapesOracleConfig widths {self.widths} / cell_dim {self.cell_dim}")
        if any(s not in SHAPES for s in self.shapes) or any(c not in COLOURS for c in self.colours):
            raise ValueError(f"ShapesOracleConfig: unknown shape or colour in {self.shapes}, {self.colours}")

    @property
    def num_classes(self) -> int:
        return len(self.shapes) * len(self.colours)


class ShapesOracle(nn.Module):
    """Per-cell classifier of shapes images (see the module docstring)."""

    def __init__(self, config: ShapesOracleConfig | None = None):
        super().__init__()
        self.config = cfg = config or ShapesOracleConfig()
        w1, w2, w3 = cfg.widths
        self.body = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1), nn.ReLU(), nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.to_features = nn.Linear(w3 * (CELL // 4) ** 2, cfg.cell_dim)
        self.head = nn.Linear(cfg.cell_dim, 1 + cfg.num_classes)
        self.info: dict = {}  # training record, saved in config.json

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def feature_dim(self) -> int:
        return GRID * GRID * self.config.cell_dim

    @property
    def input_size(self) -> tuple[int, int]:
        return (GRID * CELL, GRID * CELL)

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → the nine cells (B·9, 3, CELL, CELL), in reading order."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"shapes oracle expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        s = GRID * CELL
        x = x.float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        B = x.shape[0]
        x = x.reshape(B, 3, GRID, CELL, GRID, CELL).permute(0, 2, 4, 1, 3, 5)  # (B, row, col, 3, CELL, CELL)
        return x.reshape(B * GRID * GRID, 3, CELL, CELL)

    def cell_features_and_logits(self, x: torch.Tensor):
        """Cell embeddings (B, 9, cell_dim) and cell logits (B, 9, 1 + K)."""
        B = x.shape[0]
        h = F.relu(self.to_features(self.body(self.cells(x)).flatten(1)))  # (B·9, cell_dim)
        return h.reshape(B, GRID * GRID, -1), self.head(h).reshape(B, GRID * GRID, -1)

    def cell_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell_features_and_logits(x)[1]

    @staticmethod
    def image_logits(cell_logits: torch.Tensor) -> torch.Tensor:
        """(B, 9, 1 + K) cell logits → (B, K) log Σ_cells p_cell(class), the expected count of each class."""
        logp = F.log_softmax(cell_logits, dim=-1)[..., 1:]  # (B, 9, K) log p_cell(class)
        return torch.logsumexp(logp, dim=1)

    def features_and_logits(self, x: torch.Tensor):
        feats, cl = self.cell_features_and_logits(x)
        return feats.flatten(1), self.image_logits(cl)  # (B, 9·cell_dim), (B, K)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell_logits(x)

    @torch.no_grad()
    def read_cells(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted per-cell targets (B, 9): 0 = empty, 1 + shape·num_colours + colour."""
        return self.cell_logits(x).argmax(-1)

    @torch.no_grad()
    def describe(self, x: torch.Tensor) -> list[str]:
        """Captions of what the oracle sees, in the dataset's wording ("" for an empty image)."""
        out = []
        for row in self.read_cells(x).tolist():
            parts = []
            for cell, t in enumerate(row):
                if t:
                    shape_id, colour_id = divmod(t - 1, len(self.config.colours))
                    shape, colour = self.config.shapes[shape_id], self.config.colours[colour_id]
                    parts.append(f"a {colour} {shape} {POSITIONS[cell]}")
            out.append(parts[0] if len(parts) == 1 else (", ".join(parts[:-1]) + " and " + parts[-1]) if parts else "")
        return out

    def fingerprint(self) -> str:
        """Identity for statistics caches: config and a hash of the weights."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        cfg = json.dumps(dataclasses.asdict(self.config), sort_keys=True)
        return f"oracle:shapes:{h.hexdigest()[:16]}:{hashlib.sha256(cfg.encode()).hexdigest()[:8]}"


@torch.no_grad()
def cell_accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Scores of predicted cells against targets (both (N, 9)).

    image_accuracy: all nine cells right; object_accuracy: objects read back with the right shape and colour
    in the right cell; cell_accuracy: cells right; false_objects: objects seen in empty cells, per image.
    """
    occupied = target > 0
    return {
        "image_accuracy": float((pred == target).all(1).float().mean()),
        "object_accuracy": float((pred == target)[occupied].float().mean()) if occupied.any() else float("nan"),
        "cell_accuracy": float((pred == target).float().mean()),
        "false_objects": float(((pred > 0) & ~occupied).float().sum(1).mean()),
    }


def shapes_arrays(split: str, n: int, seed: int = 0, size: int = 32, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, size, size) and cell targets (n, 9) of one split of the shapes world."""
    ds = ShapesDataset(split, length=n, seed=seed, size=size, **options)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["cells"] for it in items])


def evaluate_oracle(oracle: ShapesOracle, images: torch.Tensor, cells: torch.Tensor, batch_size: int = 256) -> dict:
    was = oracle.training
    oracle.eval()
    with torch.no_grad():
        pred = torch.cat([oracle.read_cells(xb) for xb in images.split(batch_size)])
    oracle.train(was)
    return cell_accuracy(pred, cells)


def augment(x: torch.Tensor, noise: float = 0.03, photometric: bool = False) -> torch.Tensor:
    """Training-time perturbations, each drawn per image: Gaussian noise of std in [0, noise]; with
    ``photometric`` first a per-channel gain in [0.92, 1.04] (about black) and a blur (mix with the 3x3 box
    average, weight in [0, 0.35]), imperfections of generated images."""
    B = x.shape[0]
    if photometric:
        gain = torch.empty(B, 3, 1, 1).uniform_(0.92, 1.04)
        x = (x + 1) * gain - 1
        a = torch.empty(B, 1, 1, 1).uniform_(0.0, 0.35)
        x = (1 - a) * x + a * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if noise > 0:
        x = x + noise * torch.rand(B, 1, 1, 1) * torch.randn_like(x)
    return x


def train_shapes_oracle(out_dir: str | os.PathLike | None = None, *, n_train: int = 20_000, n_test: int = 2_000,
                        epochs: int = 5, batch_size: int = 128, lr: float = 4e-3, noise: float = 0.03,
                        size: int = 32, seed: int = 0, photometric: bool = False,
                        config: ShapesOracleConfig | None = None, verbose: bool = True) -> tuple[ShapesOracle, dict]:
    """Train the oracle on ``n_train`` train-split images, score it on ``n_test`` test-split images.

    Adam with a one-cycle schedule (15% warm-up to ``lr``, cosine decay); per-cell cross-entropy. Training
    images get Gaussian noise of std up to ``noise`` and, with ``photometric``, colour gain and blur
    (:func:`augment`); the test images are clean. Seeding is local. (Measured with the defaults: 99.45%
    image accuracy. ``photometric=True`` read a 32.4 dB KL-f4 autoencoder's reconstructions better, 83% vs 72%
    of images exactly right, but scored 97.5-98.3% on clean test images, so it is off by default.)
    Returns (oracle, scores on the test split); saves the oracle to ``out_dir`` when given.
    """
    t0 = time.time()
    x_tr, c_tr = shapes_arrays("train", n_train, seed=seed, size=size)
    x_te, c_te = shapes_arrays("test", n_test, seed=seed + 1, size=size)
    t_data = time.time() - t0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        oracle = ShapesOracle(config)
        opt = torch.optim.Adam(oracle.parameters(), lr=lr)
        steps = epochs * (n_train // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
        oracle.train()
        for epoch in range(epochs):
            perm = torch.randperm(n_train)
            for i in range(n_train // batch_size):
                b = perm[i * batch_size:(i + 1) * batch_size]
                xb = augment(x_tr[b], noise, photometric)
                loss = F.cross_entropy(oracle.cell_logits(xb).flatten(0, 1), c_tr[b].flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if verbose:
                print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    oracle.eval().requires_grad_(False)
    scores = evaluate_oracle(oracle, x_te, c_te)
    train_scores = evaluate_oracle(oracle, x_tr[:n_test], c_tr[:n_test])
    oracle.info = {"test": scores, "train": train_scores, "n_train": n_train, "n_test": n_test, "epochs": epochs,
                   "size": size, "seed": seed, "noise": noise, "photometric": photometric,
                   "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t0, 1)}
    if verbose:
        print(f"shapes oracle: held-out test split ({n_test} images, layouts unseen in training): "
              f"image accuracy {scores['image_accuracy']:.4f}, object accuracy {scores['object_accuracy']:.4f}, "
              f"cell accuracy {scores['cell_accuracy']:.4f}, false objects/image {scores['false_objects']:.4f} "
              f"(train image accuracy {train_scores['image_accuracy']:.4f}; {oracle.info['train_seconds']} s)",
              flush=True)
    if out_dir is not None:
        save_shapes_oracle(oracle, out_dir)
    return oracle, scores


# ---------------------------------------------------------------------------------------------- save / load

def save_shapes_oracle(oracle: ShapesOracle, out_dir: str | os.PathLike) -> Path:
    """Write the oracle folder: ``model.safetensors`` and ``config.json`` (kind, config and info), each atomically."""
    return save_network(oracle, out_dir, {"kind": "shapes-oracle", "config": dataclasses.asdict(oracle.config),
                                          "info": oracle.info})


def load_shapes_oracle(path: str | os.PathLike, device=None) -> ShapesOracle:
    """Load an oracle folder (or a file in it); eval mode, no gradients. Missing/corrupt files raise clear errors."""
    return load_network(path, lambda c: ShapesOracle(ShapesOracleConfig.from_dict(c)), what="shapes oracle",
                        hint="train one: latentdiff oracle shapes", kind="shapes-oracle", device=device)


def main(argv=None):
    """python -m latentdiff.eval.shapes_oracle OUT_DIR [--n-train N] [--epochs E]: train, print accuracy, save."""
    import argparse

    ap = argparse.ArgumentParser(description="Train the shapes oracle, print its held-out accuracy, save it.")
    ap.add_argument("out_dir")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photometric", action="store_true", help="also train on colour-gain / blur perturbed images")
    args = ap.parse_args(argv)
    train_shapes_oracle(args.out_dir, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, seed=args.seed,
                        photometric=args.photometric)


if __name__ == "__main__":
    main()
