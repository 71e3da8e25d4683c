"""Sample-quality metrics from network features, and reconstruction metrics on images.

- FID  (Heusel et al. 2017): Frechet distance between Gaussians fitted to two feature sets.
- KID  (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets.
- IS   (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits.
- precision / recall (Kynkaanniemi et al. 2019): k-NN manifolds of real and generated features.
- PSNR and SSIM (Wang et al. 2004) for autoencoder reconstructions, images in [-1, 1].

Feature sets are streamed through ``FeatureStats`` (float64 running moments; features kept for KID / PR).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F


def _as_2d_float64(x, name: str = "features") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x


class FeatureStats:
    """Accumulates features batch by batch: count, mean and covariance in float64, plus the features (and
    classifier logits, if given) themselves for KID, precision/recall and the Inception Score.

    Moments are accumulated around a shift (the first batch's mean) so that the covariance does not lose
    precision to cancellation: cov = (sum d d^T - n m m^T) / (n - 1) with d = x - shift, m = mean(d).
    ``max_kept`` caps how many rows of features / logits are kept (None: all, 0: none); the moments
    always cover every row.
    """

    def __init__(self, dim: int | None = None, max_kept: int | None = None):
        self.dim = dim
        self.max_kept = max_kept
        self.n = 0
        self._shift = None      # (D,) float64
        self._sum = None        # (D,) float64, sum of (x - shift)
        self._sum_outer = None  # (D, D) float64, sum of (x - shift)(x - shift)^T
        self._kept: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        self._n_kept = 0

    def update(self, feats, logits=None) -> "FeatureStats":
        """Add a batch: feats (B, D); logits (B, K) or None (give logits with every batch or never)."""
        x = _as_2d_float64(feats)
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed: expected {self.dim}, got {x.shape[1]}")
        if logits is not None:
            logits = _as_2d_float64(logits, "logits")
            if len(logits) != len(x):
                raise ValueError(f"{len(logits)} logits rows for {len(x)} feature rows")
        if (logits is None) != (not self._logits) and self._n_kept:
            raise ValueError("logits must be given with every batch or with none")
        if len(x) == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(axis=0)
            self._sum = np.zeros(self.dim)
            self._sum_outer = np.zeros((self.dim, self.dim))
        d = x - self._shift
        self._sum += d.sum(axis=0)
        self._sum_outer += d.T @ d
        self.n += len(x)
        room = len(x) if self.max_kept is None else max(0, min(len(x), self.max_kept - self._n_kept))
        if room:
            self._kept.append(x[:room].astype(np.float32))
            if logits is not None:
                self._logits.append(logits[:room].astype(np.float32))
            self._n_kept += room
        return self

    @classmethod
    def from_features(cls, feats, logits=None, max_kept: int | None = None) -> "FeatureStats":
        return cls(max_kept=max_kept).update(feats, logits)

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("FeatureStats is empty")
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (divides by n - 1, as numpy.cov and the standard FID do)."""
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 features, have {self.n}")
        m = self._sum / self.n
        return (self._sum_outer - self.n * np.outer(m, m)) / (self.n - 1)

    @property
    def features(self) -> np.ndarray:
        """The kept features, (N_kept, D) float32."""
        if len(self._kept) > 1:
            self._kept = [np.concatenate(self._kept)]
        return self._kept[0] if self._kept else np.zeros((0, self.dim or 0), np.float32)

    @property
    def logits(self) -> np.ndarray | None:
        """The kept logits, (N_kept, K) float32, or None when none were given."""
        if len(self._logits) > 1:
            self._logits = [np.concatenate(self._logits)]
        return self._logits[0] if self._logits else None

    @classmethod
    def from_moments(cls, n: int, mean, cov, features=None, logits=None) -> "FeatureStats":
        """Rebuild from saved moments (the reference-statistics cache)."""
        mean = np.asarray(mean, np.float64)
        cov = np.asarray(cov, np.float64)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean {mean.shape} and cov {cov.shape} do not match")
        s = cls(dim=mean.shape[0])
        s.n = int(n)
        s._shift = mean.copy()
        s._sum = np.zeros_like(mean)
        s._sum_outer = cov * (s.n - 1)
        if features is not None and len(features):
            s._kept = [np.asarray(features, np.float32)]
            s._n_kept = len(features)
            if logits is not None:
                s._logits = [np.asarray(logits, np.float32)]
        return s


# ---------------------------------------------------------------------------------------------- FID

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017, eq. 6).

    As the standard implementation: when sqrtm(S1 S2) is not finite (near-singular product), retry with
    eps * I added to both covariances; a complex result whose diagonal imaginary part exceeds 1e-3 (relative
    to the largest real diagonal entry when that is above 1: features of large magnitude, or fewer samples than
    dimensions, leave proportionally larger numerical noise) is an error, smaller imaginary parts are dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # handled below by the finiteness check
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: sqrtm(S1 S2) is singular; adding {eps} to the covariance diagonals", RuntimeWarning,
                          stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"FID: matrix square root has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid(feats_a, feats_b) -> float:
    """FID between two (N, D) feature sets."""
    return fid_from_stats(FeatureStats.from_features(feats_a, max_kept=0),
                          FeatureStats.from_features(feats_b, max_kept=0))


# ---------------------------------------------------------------------------------------------- KID

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x . y / d + coef0)^degree, the KID kernel (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2: mean of off-diagonal k(x, x') + mean of off-diagonal k(y, y') - 2 mean k(x, y)."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased MMD^2 over ``num_subsets`` random subsets (without replacement).

    ``subset_size`` is capped at the smaller set's size (>= 2 needed).
    """
    a, b = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, have {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    vals = np.array([mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
                     for _ in range(num_subsets)])
    return float(vals.mean()), float(vals.std())


# ---------------------------------------------------------------------------------------------- IS

def inception_score(logits=None, probs=None, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, p(y) the split's mean prediction; returns (mean, std).

    Give either ``logits`` (N, K) (softmaxed here, in float64) or ``probs`` (N, K) rows summing to 1.
    """
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of logits= or probs=")
    if logits is not None:
        z = _as_2d_float64(logits, "logits")
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    else:
        p = _as_2d_float64(probs, "probs")
        if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs must be non-negative with rows summing to 1")
    if not 1 <= splits <= len(p):
        raise ValueError(f"splits must be in [1, N={len(p)}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        p_y = part.mean(axis=0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.maximum(part, 1e-300)) - np.log(np.maximum(p_y, 1e-300))), 0.0)
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_accuracy(logits, labels) -> float:
    """Share of rows whose argmax matches the label (an oracle's accuracy on class-conditional samples)."""
    z = _as_2d_float64(logits, "logits")
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(y) != len(z):
        raise ValueError(f"{len(y)} labels for {len(z)} logits rows")
    return float((z.argmax(axis=1) == y).mean())


# ---------------------------------------------------------------------------------------------- precision / recall

def _kth_nn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (k = 1 is the nearest neighbour)."""
    radii = []
    for i in range(0, len(x), batch_size):
        d = torch.cdist(x[i:i + batch_size], x)  # (b, N)
        # the (k+1)-th smallest includes the point itself at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_in_manifold(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of queries inside the union of balls B(support_j, radii_j)."""
    inside = 0
    for i in range(0, len(queries), batch_size):
        d = torch.cdist(queries[i:i + batch_size], support)  # (b, N_support)
        inside += (d <= radii[None, :]).any(dim=1).sum().item()
    return inside / len(queries)


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024, device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the k-th
    nearest neighbour in the same set. precision = share of fake inside the real manifold; recall = share
    of real inside the fake manifold. Distances in float32 on ``device`` (default CPU), ``batch_size``
    query rows at a time (memory: batch_size x N floats).
    """
    r = torch.from_numpy(_as_2d_float64(real, "real")).float().to(device)
    f = torch.from_numpy(_as_2d_float64(fake, "fake")).float().to(device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, have {len(r)}, {len(f)}")
    r_radii = _kth_nn_radii(r, k, batch_size)
    f_radii = _kth_nn_radii(f, k, batch_size)
    precision = _fraction_in_manifold(f, r, r_radii, batch_size)
    recall = _fraction_in_manifold(r, f, f_radii, batch_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------- PSNR / SSIM

def _check_pair(x: torch.Tensor, y: torch.Tensor):
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(L^2 / MSE) dB; L = 2 for images in [-1, 1]. (B,)"""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)  # inf where identical


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels and valid window positions.

    Gaussian window 11x11, sigma 1.5, C1 = (k1 L)^2, C2 = (k2 L)^2 with L the data range (2 for [-1, 1]).
    No padding (the paper's 'valid' filtering); images smaller than the window use a window of the
    image's smaller side (made odd). Returns (B,).
    """
    _check_pair(x, y)
    size = min(window_size, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    x, y = x.double(), y.double()
    c = x.shape[1]
    g = _gaussian_window(size, sigma, x.dtype)
    w = (g[:, None] * g[None, :]).expand(c, 1, size, size)  # depthwise separable gaussian

    def blur(z):
        return F.conv2d(z, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)
