"""All feature metrics of one sample set against a reference, and the floor: the same metrics between two
disjoint halves of the real data, printed beside a model's figures so that they can be read.

FID and KID are biased by sample size: compare a model's figure with the floor computed at the same
number of generated images (``real_floor(ref, n=num_samples)``).
"""

from __future__ import annotations

import numpy as np

from .ceiling import equal_size_precision_recall
from .metrics import FeatureStats, class_accuracy, fid_from_stats, inception_score, kid


def compare(real: FeatureStats, fake: FeatureStats, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
            pr_k: int = 3, is_splits: int = 10, fake_labels=None, seed: int = 0) -> dict:
    """Metrics of ``fake`` against ``real``: what the kept features and logits allow.

    Returns a dict with fid, n_real, n_fake always; kid_mean / kid_std and precision / recall when both
    sides kept features (precision / recall with the real rows cut at random to as many as ``fake`` has: see
    ceiling.equal_size_precision_recall); is_mean / is_std when ``fake`` kept logits (at most ``is_splits`` splits, at
    least 1); accuracy when ``fake_labels`` (the classes asked for) are given with logits.
    """
    out = {"n_real": real.n, "n_fake": fake.n, "fid": fid_from_stats(real, fake)}
    fr, ff = real.features, fake.features
    if len(fr) >= 2 and len(ff) >= 2:
        out["kid_mean"], out["kid_std"] = kid(fr, ff, num_subsets=kid_subsets, subset_size=kid_subset_size,
                                              seed=seed)
    if len(fr) > pr_k and len(ff) > pr_k:
        out["precision"], out["recall"] = equal_size_precision_recall(fr, ff, k=pr_k, seed=seed)
    if fake.logits is not None and len(fake.logits):
        out["is_mean"], out["is_std"] = inception_score(logits=fake.logits,
                                                        splits=max(1, min(is_splits, len(fake.logits))))
        if fake_labels is not None:
            out["accuracy"] = class_accuracy(fake.logits, fake_labels)
    return out


def split_stats(ref: FeatureStats, n: int | None = None, seed: int = 0) -> tuple[FeatureStats, FeatureStats]:
    """Two disjoint random parts of the reference's kept features: (rest, part of n rows).

    n defaults to half. The rest (every other kept row) plays the reference, the part plays the samples.
    """
    feats, logits = ref.features, ref.logits
    total = len(feats)
    n = total // 2 if n is None else int(n)
    if total < 4 or not 2 <= n <= total - 2:
        raise ValueError(f"a floor needs the reference's kept features split in two parts of >= 2 rows; "
                         f"have {total} kept features, asked for a part of {n} (cache with max_kept=None "
                         f"or large enough)")
    perm = np.random.default_rng(seed).permutation(total)
    part, rest = perm[:n], perm[n:]

    def take(idx):
        return FeatureStats.from_features(feats[idx], None if logits is None else logits[idx])

    return take(rest), take(part)


def real_floor(ref: FeatureStats, n: int | None = None, seed: int = 0, **compare_kwargs) -> dict:
    """The metrics of ``compare`` between two disjoint real splits (see split_stats): the best a model
    can expect at this sample size. Also reports IS of the real part (the real data's Inception Score)."""
    rest, part = split_stats(ref, n, seed)
    return compare(rest, part, seed=seed, **compare_kwargs)
