"""Oracle networks: small classifiers trained on the real data of an embedded dataset.

An oracle plays the Inception network's role where Inception does not fit (8x8 digits, toy shapes): its
penultimate activations are the features for FID / KID / precision-recall, its logits give the Inception
Score and, for class-conditional samples, the share of samples classified as the class asked for.

Interface (shared with ``latentdiff.nn.inception.FIDInceptionV3``; see ``latentdiff.eval.features``):
    oracle.features(x) (B, feature_dim), oracle.logits(x) (B, num_classes), oracle.features_and_logits(x),
    oracle.num_classes, oracle.feature_dim, oracle.input_size, oracle.fingerprint().
x: (B, in_channels, H, W) in [-1, 1], any size: resized internally to the training size (area averaging
when shrinking, bilinear when enlarging).

On disk an oracle is a folder: ``model.safetensors`` + ``config.json`` (architecture and training record).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dataclass_io import FromDict
from ..errors import CheckpointError, MissingFileError
from ..fileio import atomic_write_bytes
from ..nn.inception import state_dict_hash

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class OracleConfig(FromDict):
    name: str = "digits"                  # the dataset the oracle is trained on (part of its identity)
    in_channels: int = 1                  # image channels it accepts
    image_size: int = 8                   # training resolution; inputs of other sizes are resized to it
    num_classes: int = 10                 # logits width
    channels: tuple = (32, 64)            # conv width per stage: one 3x3 conv each, 2x max-pool between stages
    feature_dim: int = 128                # width of the penultimate layer (the metric features)
    dropout: tuple = (0.5, 0.3)           # training dropout before the feature layer and before the logits
    class_names: list = field(default_factory=list)  # optional names of the classes, for reports

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.dropout = tuple(float(p) for p in self.dropout)
        if len(self.dropout) != 2 or not all(0 <= p < 1 for p in self.dropout):
            raise ValueError(f"dropout must be two probabilities in [0, 1), got {self.dropout}")
        if self.in_channels < 1 or self.num_classes < 2 or self.feature_dim < 1 or not self.channels:
            raise ValueError(f"invalid OracleConfig: {self}")
        if self.image_size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.channels) - 1}")


class Oracle(nn.Module):
    """CNN classifier: conv3x3-ReLU stages with a 2x max-pool between stages, flatten, dropout, linear ->
    ReLU (the features), dropout, linear (the logits). Kept tiny so that it trains in seconds on a CPU.

    Images enter as (x + 1) / 2, so that the background (-1) is 0, what the convolutions' zero padding adds.
    """

    def __init__(self, config: OracleConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], config.in_channels
        for i, c in enumerate(config.channels):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = config.image_size // 2 ** (len(config.channels) - 1)
        self.drop_features = nn.Dropout(config.dropout[0])
        self.to_features = nn.Linear(c_in * side * side, config.feature_dim)
        self.drop_head = nn.Dropout(config.dropout[1])
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.info: dict = {}  # training record (accuracy, split sizes, ...), saved in config.json

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) of any size -> (B, C, S, S), S the training size."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"oracle '{self.config.name}' expects (B, {self.config.in_channels}, H, W) images, "
                             f"got shape {tuple(x.shape)}")
        s = self.config.image_size
        if x.shape[-2:] == (s, s):
            return x
        if x.shape[-2] >= s and x.shape[-1] >= s:
            return F.adaptive_avg_pool2d(x, s)  # area average: undoes nearest upsampling exactly
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body((self.resize(x.float()) + 1) / 2).flatten(1)  # (B, C * side * side)
        feats = F.relu(self.to_features(self.drop_features(h)))     # (B, feature_dim)
        return feats, self.head(self.drop_head(feats))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def fingerprint(self) -> str:
        """Identity for statistics caches: config and a hash of the weights."""
        cfg = json.dumps(dataclasses.asdict(self.config), sort_keys=True)
        return f"oracle:{self.config.name}:{state_dict_hash(self.state_dict())}:{_hash_text(cfg)}"


def _hash_text(s: str) -> str:
    import hashlib
    return hashlib.sha256(s.encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------------- save / load

def save_network(model: nn.Module, out_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``out_dir/model.safetensors`` (the state dict) and ``out_dir/config.json`` (``record``), each
    atomically."""
    from safetensors.torch import save
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(state))
    atomic_write_bytes(out / CONFIG_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return out


def save_oracle(oracle: Oracle, out_dir: str | os.PathLike) -> Path:
    """Write the oracle folder: ``model.safetensors`` and ``config.json`` (config and info)."""
    return save_network(oracle, out_dir, {"config": dataclasses.asdict(oracle.config), "info": oracle.info})


def load_network(path: str | os.PathLike, build, *, what: str, hint: str, kind: str | None = None,
                 device=None) -> nn.Module:
    """Load a folder written by :func:`save_network` (or a file in it): ``build(record["config"])`` makes the
    module, whose weights must match the file's names and shapes; ``kind`` (when given) must equal the
    record's. Eval mode, no gradients, ``.info`` from the record. Missing or corrupt files raise errors that
    name them and ``what`` was being loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.name in (WEIGHTS_FILE, CONFIG_FILE) else path
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MissingFileError(f"{what} file not found: {p} ({hint})")
    try:
        record = json.loads(cfg_path.read_text())
        if kind is not None and record.get("kind") != kind:
            raise KeyError(f"kind is {record.get('kind')!r}, expected {kind!r}")
        net = build(record["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"corrupt {what} config {cfg_path}: {e!r}") from None
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupt {what} weights {w_path}: {e}") from None
    expected = net.state_dict()
    bad = sorted(set(expected) ^ set(state))
    bad += [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{what} weights {w_path} do not match its config: {bad[:8]}")
    net.load_state_dict(state)
    net.info = record.get("info", {})
    net.eval().requires_grad_(False)
    return net.to(device) if device is not None else net


def load_oracle(path: str | os.PathLike, device=None) -> Oracle:
    """Load an oracle folder (or its config.json / model.safetensors path); eval mode, no gradients."""
    return load_network(path, lambda c: Oracle(OracleConfig.from_dict(c)), what="oracle",
                        hint="train one with train_digits_oracle", device=device)


# ---------------------------------------------------------------------------------------------- training

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as (1797, 1, 8, 8) float32 in [-1, 1] (pixel / 16 * 2 - 1) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits oracle needs scikit-learn (pip install 'latentdiff[demo]')") from e
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return x[:, None], d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``test_fraction`` of each class held out, drawn with ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in each direction, filling with background (-1)."""
    if max_shift <= 0:
        return x
    s, (h, w) = max_shift, x.shape[-2:]
    padded = F.pad(x, (s, s, s, s), value=-1.0)  # (B, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * s + 1, (len(x),)).tolist()
    dx = torch.randint(0, 2 * s + 1, (len(x),)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])


def _fit(config, x_t, y_t, train_idx, epochs, batch_size, lr, weight_decay, label_smoothing, max_shift, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        oracle = Oracle(config)
        opt = torch.optim.Adam(oracle.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((len(train_idx) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        oracle.train()
        for _ in range(epochs):
            perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx))]
            for i in range(0, len(perm), batch_size):
                b = perm[i:i + batch_size]
                logits = oracle.logits(random_shift(x_t[b], max_shift))
                loss = F.cross_entropy(logits, y_t[b], label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return oracle


def train_oracle(config: OracleConfig, x: np.ndarray, y: np.ndarray, *, test_fraction: float = 0.2,
                 epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                 label_smoothing: float = 0.1, max_shift: int = 0, seed: int = 0,
                 verbose: bool = True) -> tuple[Oracle, float]:
    """Train an oracle on (x, y) with a stratified held-out split; returns (oracle, test accuracy).

    Adam with cosine learning-rate decay, cross-entropy with label smoothing, dropout; optional random
    shifts of up to ``max_shift`` pixels (off by default: on 8x8 digits one pixel is a large move).
    Runs on a CPU in seconds for the embedded datasets. ``seed`` draws the split, the initial weights and
    the batches; seeding is local (the global RNG state is restored afterwards).
    """
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.time()
    threads = torch.get_num_threads()
    # The layers are too small to gain from intra-op threads; on a busy CPU, thread synchronisation made
    # training several times slower. One thread, restored afterwards.
    torch.set_num_threads(1)
    try:
        oracle = _fit(config, x_t, y_t, train_idx, epochs, batch_size, lr, weight_decay, label_smoothing,
                      max_shift, seed)
    finally:
        torch.set_num_threads(threads)
    oracle.eval().requires_grad_(False)
    with torch.no_grad():
        test_acc = (oracle.logits(x_t[test_idx]).argmax(1) == y_t[test_idx]).float().mean().item()
        train_acc = (oracle.logits(x_t[train_idx]).argmax(1) == y_t[train_idx]).float().mean().item()
    oracle.info = {"test_accuracy": test_acc, "train_accuracy": train_acc, "n_train": int(len(train_idx)),
                   "n_test": int(len(test_idx)), "test_fraction": test_fraction, "epochs": epochs,
                   "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                   "label_smoothing": label_smoothing, "max_shift": max_shift, "seed": seed,
                   "train_seconds": round(time.time() - t0, 2)}
    if verbose:
        print(f"oracle '{config.name}': test accuracy {test_acc:.4f} on {len(test_idx)} held-out images "
              f"(train {train_acc:.4f}, {oracle.info['train_seconds']} s)")
    return oracle, test_acc


def train_digits_oracle(out_path: str | os.PathLike | None = None, *, epochs: int = 30, seed: int = 0,
                        test_fraction: float = 0.2, verbose: bool = True, **train_kwargs) -> tuple[Oracle, float]:
    """Train the digits oracle (8x8, 10 classes) on scikit-learn's digits, 20% held out per class; save it
    to ``out_path`` (a folder) when given. Returns (oracle, held-out test accuracy). Other keyword
    arguments go to train_oracle."""
    x, y = digits_arrays()
    config = OracleConfig(name="digits", in_channels=1, image_size=8, num_classes=10,
                          class_names=[str(i) for i in range(10)])
    oracle, acc = train_oracle(config, x, y, test_fraction=test_fraction, epochs=epochs, seed=seed,
                               verbose=verbose, **train_kwargs)
    if out_path is not None:
        save_oracle(oracle, out_path)
    return oracle, acc


def digits_oracle(path: str | os.PathLike, device=None, **train_kwargs) -> Oracle:
    """Load the digits oracle from ``path``, training and saving it there first when it is missing."""
    if not (Path(path) / CONFIG_FILE).is_file():
        train_digits_oracle(path, **train_kwargs)
    return load_oracle(path, device=device)


def main(argv=None):
    """python -m latentdiff.eval.oracle OUT_DIR [--epochs N] [--seed S]: train and save the digits oracle."""
    import argparse
    ap = argparse.ArgumentParser(description="Train the digits oracle and save it to a folder.")
    ap.add_argument("out_dir")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train_digits_oracle(args.out_dir, epochs=args.epochs, seed=args.seed)


if __name__ == "__main__":
    main()
