"""The first stage's ceiling: what a latent model's samples can score at best, in a given feature space.

A latent diffusion model draws z and shows D(z); even a perfect model of the latents of real images shows
reconstructions x̂ = D(E(x)), not images x. So FID, precision and recall of x̂ against x (in the same
feature network as sample metrics) bound what the model can reach, and their gap to the real floor (the
same metrics between x and *other* real images) is the part of a model's gap that belongs to the
autoencoder, not to diffusion (LDM, Rombach et al. 2022, Sec. 4.1 and Table 8 report R-FID for this).

Precision and recall (Kynkaanniemi et al. 2019) are k-NN manifold tests: a reconstruction counts as precise
when it lies within the k-th-nearest-neighbour radius of some real image. When the feature network
separates images finer than the autoencoder preserves (sub-pixel blur, a shifted edge), reconstructions
fall outside every ball although each is read as the same scene: a low ``precision`` here with a high
``exact`` (the oracle's reading unchanged) shows that the metric, not the picture, moved.
"""

from __future__ import annotations

import numpy as np
import torch

from .features import extract_stats
from .metrics import fid_from_stats, precision_recall
from .reconstruction import reconstruct_timed


def _metrics(real, fake, k: int) -> dict:
    precision, recall = precision_recall(real.features, fake.features, k=k)
    return {"fid": fid_from_stats(real, fake), "precision": precision, "recall": recall, "n": fake.n}


@torch.no_grad()
def _read(net, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    from .adherence import read_cells  # the same reading (8-bit, eval mode) as prompt adherence
    return read_cells(net, images, batch_size)


def equal_size_precision_recall(real, fake, k: int = 3, seed: int = 0) -> tuple[float, float]:
    """Precision and recall with the real set cut (at random, ``seed``) to as many rows as ``fake``, as
    Kynkaanniemi et al. (2019) compare sets of equal size: the k-NN radii of the real manifold then do not
    shrink with the size of a cached reference. (In the finite shapes world a 50,000-image reference packs
    the balls down to the distance between images one jitter step apart; see
    benchmarks/oracle_feature_sensitivity.py.)"""
    real, fake = np.asarray(real), np.asarray(fake)
    if len(real) > len(fake):
        real = real[np.sort(np.random.default_rng(seed).choice(len(real), len(fake), replace=False))]
    return precision_recall(real, fake, k=k)


def reconstruction_ceiling(autoencoder, oracle, images: torch.Tensor, *, other_images: torch.Tensor | None = None,
                           cells: torch.Tensor | None = None, k: int = 3, batch_size: int = 64,
                           sample: bool = False, seed: int = 0) -> dict:
    """FID, precision and recall of the autoencoder's reconstructions D(E(x)) of ``images`` x against x, in
    ``oracle``'s feature space (``features_and_logits``; any FID feature network works).

    Returns {"ceiling": {fid, precision, recall, n}, "floor": the same for ``other_images`` (real images
    disjoint from x, as many as x) against x, or None, "exact": share of reconstructions that the oracle reads
    exactly as it reads their originals (when it has ``cell_logits``), "exact_vs_targets": {"originals",
    "reconstructions"}: share read exactly as the targets ``cells`` (N, 9) (when given)}.
    KL autoencoders reconstruct from the posterior mean unless ``sample``. Images are 8-bit quantised before
    the features, as PNG files would be (eval/features.py).
    """
    if images.ndim != 4 or len(images) <= k:
        raise ValueError(f"reconstruction ceiling: need (N, C, H, W) images with N > k = {k}, got "
                         f"{tuple(images.shape)}")
    if cells is not None and tuple(cells.shape) != (len(images), 9):
        raise ValueError(f"reconstruction ceiling: cells must be ({len(images)}, 9), got {tuple(cells.shape)}")
    rec, _, _ = reconstruct_timed(autoencoder, images, batch_size=batch_size, sample=sample, seed=seed)
    kw = {"batch_size": batch_size}
    real = extract_stats(oracle, images, **kw)
    out = {"ceiling": _metrics(real, extract_stats(oracle, rec, **kw), k), "floor": None}
    if other_images is not None:
        other = other_images[:len(images)]
        if len(other) <= k:
            raise ValueError(f"reconstruction ceiling: other_images needs more than k = {k} images, got {len(other)}")
        out["floor"] = _metrics(real, extract_stats(oracle, other, **kw), k)
    if hasattr(oracle, "cell_logits"):
        read_x, read_rec = _read(oracle, images, batch_size), _read(oracle, rec, batch_size)
        out["exact"] = float((read_x == read_rec).all(1).float().mean())
        if cells is not None:
            cells = cells.long().cpu()
            out["exact_vs_targets"] = {"originals": float((read_x == cells).all(1).float().mean()),
                                       "reconstructions": float((read_rec == cells).all(1).float().mean())}
    return out


def format_ceiling(result: dict) -> str:
    """metric | reconstructions vs originals (ceiling) | other real images vs originals (floor)."""
    c, f = result["ceiling"], result.get("floor") or {}
    rows = [("metric", "reconstructions (ceiling)", "other real images (floor)")]
    for name, digits in (("fid", 4), ("precision", 3), ("recall", 3)):
        rows.append((name, f"{c[name]:.{digits}g}", f"{f[name]:.{digits}g}" if name in f else "-"))
    if "exact" in result:
        rows.append(("oracle reads the same scene", f"{result['exact']:.1%}", "-"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c_}" for a, b, c_ in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
