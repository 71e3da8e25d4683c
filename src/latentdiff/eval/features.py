"""Running a feature network over images: batching, 8-bit quantisation, accumulation into FeatureStats.

A feature network is any object with (the FID Inception of ``latentdiff.nn.inception`` and the oracles of
``latentdiff.eval.oracle`` both are):

    features_and_logits(x) -> (features (B, D), logits (B, K))   x: (B, C, H, W) in [-1, 1], any size
    fingerprint() -> str        identity of the network and its weights (keys the statistics cache)
    feature_dim: int, num_classes: int

Image sources accepted by ``image_batches`` / ``extract_stats``:
- a tensor (N, C, H, W);
- a map-style dataset whose items are dicts with "image" (C, H, W) (the project's datasets), tensors,
  or tuples whose first element is the image;
- any iterable of batches: tensors (B, C, H, W), dicts with "image", or tuples (image, ...) -- e.g. a
  generator that yields sampled images.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from ..errors import DataError
from .metrics import FeatureStats


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels an 8-bit PNG would store (clamping first), staying in [-1, 1].

    Real data on disk is 8-bit; quantising generated samples the same way keeps the comparison fair.
    """
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _image_of(item) -> torch.Tensor:
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"dataset item has no 'image' key (keys: {sorted(item)})")
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"expected an image tensor, got {type(item).__name__}")
    return item


def _is_map_dataset(source) -> bool:
    return (hasattr(source, "__getitem__") and hasattr(source, "__len__")
            and not isinstance(source, (torch.Tensor, list, tuple)))


def image_batches(source, batch_size: int = 64, indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield (B, C, H, W) image batches from a tensor, a map-style dataset or an iterable of batches.

    ``indices`` selects items of a tensor or dataset (e.g. one split); not allowed with an iterable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise ValueError(f"image tensor must be (N, C, H, W), got shape {tuple(source.shape)}")
        if indices is not None:
            source = source[torch.as_tensor(list(indices), dtype=torch.long)]
        yield from source.split(batch_size)
        return
    if _is_map_dataset(source):
        idx = list(range(len(source))) if indices is None else list(indices)
        for i in range(0, len(idx), batch_size):
            yield torch.stack([_image_of(source[j]) for j in idx[i:i + batch_size]])
        return
    if indices is not None:
        raise ValueError("indices= needs a tensor or a map-style dataset, not an iterable of batches")
    for batch in source:
        x = _image_of(batch)
        yield x if x.ndim == 4 else x[None]


@torch.no_grad()
def extract_stats(net, source, *, batch_size: int = 64, indices: Sequence[int] | None = None,
                  max_items: int | None = None, max_kept: int | None = None, quantize: bool = True,
                  keep_logits: bool = True, device=None, progress: bool = False) -> FeatureStats:
    """Run ``net`` over the images of ``source`` and accumulate a FeatureStats (moments over all images;
    features and logits kept up to ``max_kept`` rows).

    quantize: round images to 8 bits first (see quantize_8bit). max_items: stop after this many images.
    device: where the network runs (None: where its parameters are).
    """
    if device is not None and isinstance(net, torch.nn.Module):
        net = net.to(device)
    if device is None and isinstance(net, torch.nn.Module):
        device = next(net.parameters()).device
    stats = FeatureStats(max_kept=max_kept)
    batches: Iterable[torch.Tensor] = image_batches(source, batch_size, indices)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="features", unit="img", total=max_items)
    for x in batches:
        if max_items is not None:
            x = x[: max_items - stats.n]
        if len(x) == 0:
            break
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        x = x.to(device=device, dtype=torch.float32)
        if quantize:
            x = quantize_8bit(x)
        feats, logits = net.features_and_logits(x)
        stats.update(feats.double().cpu(), logits.double().cpu() if keep_logits else None)
        if bar is not None:
            bar.update(len(x))
        if max_items is not None and stats.n >= max_items:
            break
    if bar is not None:
        bar.close()
    if stats.n == 0:
        raise DataError("no images to extract features from")
    return stats
