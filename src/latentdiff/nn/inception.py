"""The Inception-v3 variant behind the standard FID (Heusel et al. 2017), for FID, KID, IS and precision/recall.

The standard FID was defined with TensorFlow's 2015-12-05 Inception graph. Its PyTorch port (pytorch-fid,
weights file ``pt_inception-2015-12-05-6726825d.pth``) differs from the ImageNet Inception-v3 in four places,
which this module reproduces so that the published file loads and gives the published numbers:

- the average-pool branch of the A, C and first E blocks (Mixed_5*, Mixed_6b..e, Mixed_7b) excludes the
  zero padding from its average (``count_include_pad=False``);
- the pool branch of the last E block (Mixed_7c) is a 3x3 max-pool instead of an average-pool;
- the classifier has 1008 outputs (the TF graph's label space), used by the Inception Score;
- no auxiliary classifier.

Outputs: ``features(x)`` the 2048-d "pool3" activations (global average of Mixed_7c), ``logits(x)`` the
1008 class logits. Input: images in [-1, 1], NCHW, 1 or 3 channels, any size; they are resized to 299x299
bilinearly (``align_corners=False``, no antialias, as pytorch-fid does) and fed as they are, since the
network expects [-1, 1].

Weights never come from the network: pass the file's path, or set ``LATENTDIFF_FID_WEIGHTS``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, MissingFileError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_ENV = "LATENTDIFF_FID_WEIGHTS"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, the TF value) -> ReLU; state-dict keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool whose border averages count only real pixels (TF 'SAME' pooling)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1. Out: 224 + pool_ch."""

    def __init__(self, in_ch: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_ch, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class BlockB(nn.Module):
    """Mixed_6a (35 -> 17): 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2. Out: 480 + in_ch."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class BlockC(nn.Module):
    """Mixed_6b..6e (17x17), factorised 7x7 convolutions: 1x1 | 1x7,7x1 | 7x1,1x7,7x1,1x7 | avgpool->1x1. Out: 768."""

    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class BlockD(nn.Module):
    """Mixed_7a (17 -> 8): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2. Out: 512 + in_ch."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class BlockE(nn.Module):
    """Mixed_7b/7c (8x8), expanded filter banks. Out: 2048.

    ``max_pool=False``: avg-pool branch without padding in the average (Mixed_7b);
    ``max_pool=True``: 3x3 max-pool branch (Mixed_7c), both as in the TF FID graph.
    """

    def __init__(self, in_ch: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        h = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(h), self.branch3x3_2b(h)], dim=1)
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF FID graph. Module names match the published weights file's state-dict keys."""

    def __init__(self):
        super().__init__()
        # Stem: 299 -> 149 -> 147 -> 147 -> (maxpool) 73 -> 73 -> 71 -> (maxpool) 35
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_ch=32)    # -> 256
        self.Mixed_5c = BlockA(256, pool_ch=64)    # -> 288
        self.Mixed_5d = BlockA(288, pool_ch=64)    # -> 288
        self.Mixed_6a = BlockB(288)                # -> 768, 17x17
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)                # -> 1280, 8x8
        self.Mixed_7b = BlockE(1280, max_pool=False)  # -> 2048
        self.Mixed_7c = BlockE(2048, max_pool=True)   # -> 2048
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self._fingerprint: str | None = None

    # ---- input handling ----
    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 1|3, H, W) of any size -> (B, 3, 299, 299), bilinear, align_corners=False."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception expects images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB, the usual convention for MNIST-like data
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    # ---- forward ----
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) in [-1, 1] -> (pool3 features (B, 2048), logits (B, 1008)), one pass."""
        h = self.preprocess(x)
        h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(h)))
        h = F.max_pool2d(h, kernel_size=3, stride=2)
        h = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(h))
        h = F.max_pool2d(h, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            h = block(h)
        feats = h.mean(dim=(2, 3))  # (B, 2048): global average pool ("pool3")
        return feats, self.fc(feats)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    # ---- feature-network interface used by latentdiff.eval ----
    @property
    def feature_dim(self) -> int:
        return FEATURE_DIM

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def input_size(self) -> tuple[int, int]:
        return (INPUT_SIZE, INPUT_SIZE)

    def fingerprint(self) -> str:
        """Identity of this feature network for reference-statistics caches: a hash of its weights."""
        if self._fingerprint is None:
            self._fingerprint = "fid_inception_v3:" + state_dict_hash(self.state_dict())
        return self._fingerprint


def state_dict_hash(state: dict) -> str:
    """sha256 (first 16 hex digits) over sorted names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The argument, else $LATENTDIFF_FID_WEIGHTS; a clear FileNotFoundError when neither names a file."""
    how = (f"Standard FID needs the Inception weights file {FID_WEIGHTS_NAME} (the one pytorch-fid uses); "
           f"latentdiff never downloads it. Pass its local path (weights=... / --fid-weights) "
           f"or set the environment variable {FID_WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_NAME}.")
    if path is None:
        path = os.environ.get(FID_WEIGHTS_ENV) or None
    if path is None:
        raise MissingFileError("no FID Inception weights given. " + how)
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"FID Inception weights file not found: {path}. " + how)
    return path


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that is more than tensors
        raise CheckpointError(f"cannot read FID Inception weights {path}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"FID Inception weights {path} do not hold a state dict of tensors")
    return obj


def _optional_key(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BatchNorm counter: absent from converted files, unused in eval


def load_fid_inception(path: str | os.PathLike | None = None, device=None) -> FIDInceptionV3:
    """Build the FID Inception and load the published weights from a local file (.pth or .safetensors).

    Raises FileNotFoundError with instructions when no file is given/found, and ValueError naming the
    missing, unexpected or wrongly shaped keys when the file is not the FID Inception state dict.
    """
    path = resolve_weights_path(path)
    state = _read_state_dict(path)
    net = FIDInceptionV3()
    own = {k: v for k, v in net.state_dict().items() if not _optional_key(k)}
    given = {k: v for k, v in state.items() if not _optional_key(k)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = sorted(k for k in set(own) & set(given) if tuple(own[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append("wrong shapes: " + show([f"{k} {tuple(given[k].shape)} != {tuple(own[k].shape)}"
                                                  for k in wrong]))
        raise CheckpointError(f"{path} is not the FID Inception state dict ({FID_WEIGHTS_NAME}): " + "; ".join(parts))
    net.load_state_dict(given, strict=False)  # only optional BN counters may be left out
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    return net
