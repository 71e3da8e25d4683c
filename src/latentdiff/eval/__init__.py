"""latentdiff.eval: FID / KID / IS / precision-recall with a pluggable feature network, PSNR / SSIM,
cached reference statistics, oracle networks for the embedded datasets.

Typical use (the CLI's `eval` does this):

    net = load_fid_inception(path)            # or digits_oracle("outputs/oracles/digits")
    ref = reference_stats(net, dataset, dataset_id=dataset_identity("digits", len(dataset), 16, "train"),
                          cache_dir="outputs/fid_stats")
    fake = extract_stats(net, sample_batches)  # any iterable of (B, C, H, W) batches in [-1, 1]
    print(compare(ref, fake), real_floor(ref, n=fake.n))
"""

from ..nn.inception import FIDInceptionV3, load_fid_inception
from .evaluate import compare, real_floor, split_stats
from .features import extract_stats, image_batches, quantize_8bit
from .metrics import (
    FeatureStats,
    class_accuracy,
    fid,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
    psnr,
    ssim,
)
from .oracle import Oracle, OracleConfig, digits_oracle, load_oracle, save_oracle, train_digits_oracle, train_oracle
from .stats_cache import cache_path, dataset_identity, files_fingerprint, load_stats, reference_stats, save_stats

__all__ = [
    "FIDInceptionV3", "load_fid_inception",
    "compare", "real_floor", "split_stats",
    "extract_stats", "image_batches", "quantize_8bit",
    "FeatureStats", "class_accuracy", "fid", "fid_from_stats", "frechet_distance", "inception_score", "kid",
    "mmd2_unbiased", "polynomial_kernel", "precision_recall", "psnr", "ssim",
    "Oracle", "OracleConfig", "digits_oracle", "load_oracle", "save_oracle", "train_digits_oracle",
    "train_oracle",
    "cache_path", "dataset_identity", "files_fingerprint", "load_stats", "reference_stats", "save_stats",
]
