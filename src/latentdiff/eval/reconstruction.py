"""Scores of a first stage: how well x̂ = D(E(x)) reproduces held-out images x.

- PSNR (dB) and SSIM (Gaussian window 11, σ 1.5) per image, averaged (eval/metrics.py);
- rFID: the Fréchet distance between the feature statistics of the originals and of their reconstructions
  (LDM's "R-FID", Table 8), with the same feature network as sample FID (the oracle for shapes and digits,
  Inception otherwise), beside a reference for its scale: the same distance between the originals and as
  many *other* real images (a disjoint part of the data), which is what an autoencoder that turned every
  image into another real-looking image would score (rFID is 0 for a perfect autoencoder);
- encode and decode throughput (images per second on the evaluation device).

Images go through 8-bit quantisation before the feature network (eval/features.py), both originals and
reconstructions, as PNG files would.
"""

from __future__ import annotations

import time

import torch

from ..errors import DataError, RequestError
from .features import extract_stats
from .metrics import fid_from_stats, psnr, ssim

RECONSTRUCTION_METRICS = ("psnr", "ssim", "rfid")


def stack_images(dataset, num: int, start: int = 0) -> torch.Tensor:
    """Images ``start .. start + num`` of a map-style dataset (items are dicts with "image" or tensors)."""
    end = min(len(dataset), start + num)
    if end <= start:
        raise RequestError(f"the dataset has {len(dataset)} images; none from index {start}")
    items = [dataset[i] for i in range(start, end)]
    return torch.stack([it["image"] if isinstance(it, dict) else it for it in items])


@torch.no_grad()
def reconstruct_timed(autoencoder, images: torch.Tensor, *, batch_size: int = 64, sample: bool = False, seed: int = 0):
    """(reconstructions in [-1, 1] on the CPU, encode seconds, decode seconds)."""
    device = next(autoencoder.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if sample else None
    out, t_enc, t_dec = [], 0.0, 0.0
    for xb in images.split(batch_size):
        xb = xb.to(device)
        t0 = time.perf_counter()
        z = autoencoder.encode(xb, sample=sample, generator=generator)
        _sync(device)
        t1 = time.perf_counter()
        rec = autoencoder.decode(z).clamp(-1, 1)
        _sync(device)
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
        out.append(rec.float().cpu())
    return torch.cat(out), t_enc, t_dec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_reconstruction(autoencoder, images: torch.Tensor, *, metrics=RECONSTRUCTION_METRICS, net=None,
                            other_images: torch.Tensor | None = None, batch_size: int = 64, sample: bool = False,
                            seed: int = 0, device=None, progress: bool = False) -> dict:
    """Scores of ``autoencoder`` on ``images`` (N, C, H, W) in [-1, 1].

    ``net`` (a feature network with ``features_and_logits``) is needed for rfid; ``other_images`` (real images
    disjoint from ``images``) give its reference ``rfid_other_real``. KL models reconstruct from the posterior
    mean unless ``sample``. Returns psnr, psnr_std, ssim, l1, rfid, rfid_other_real, n, n_other, encode/decode
    images per second.
    """
    unknown = [m for m in metrics if m not in RECONSTRUCTION_METRICS]
    if unknown:
        raise RequestError(f"unknown reconstruction metric(s) {', '.join(unknown)}; "
                           f"expected {', '.join(RECONSTRUCTION_METRICS)}")
    if images.ndim != 4 or images.shape[1] != autoencoder.config.in_channels:
        raise DataError(f"the autoencoder takes ({autoencoder.config.in_channels}, H, W) images, "
                        f"got {tuple(images.shape[1:])}")
    if not torch.isfinite(images).all():
        raise DataError("the images contain NaN or inf")
    if "rfid" in metrics and net is None:
        raise RequestError("rfid needs a feature network")
    if device is not None:
        autoencoder = autoencoder.to(device)
    rec, t_enc, t_dec = reconstruct_timed(autoencoder, images, batch_size=batch_size, sample=sample, seed=seed)
    n = len(images)
    p = psnr(rec, images).float()
    out = {"n": n, "psnr": float(p[torch.isfinite(p)].mean()) if torch.isfinite(p).any() else float("inf"),
           "psnr_std": float(p[torch.isfinite(p)].std()) if torch.isfinite(p).sum() > 1 else 0.0,
           "l1": float((rec - images).abs().mean()),
           "encode_images_per_s": n / max(t_enc, 1e-9), "decode_images_per_s": n / max(t_dec, 1e-9)}
    if "ssim" in metrics:
        out["ssim"] = float(ssim(rec, images).mean())
    if "rfid" in metrics:
        kw = {"batch_size": batch_size, "device": device, "progress": progress}
        real = extract_stats(net, images, **kw)
        out["rfid"] = fid_from_stats(real, extract_stats(net, rec, **kw))
        if other_images is not None and len(other_images) >= 2:
            out["rfid_other_real"] = fid_from_stats(real, extract_stats(net, other_images[:n], **kw))
            out["n_other"] = min(n, len(other_images))
    return out


def format_reconstruction(result: dict) -> str:
    """An aligned text table of a reconstruction result."""
    m = result["model"]
    head = [f"{m['n']} held-out images of {result.get('data', '?')}; {result.get('autoencoder', '')}".rstrip("; ")]
    rows = [("metric", "autoencoder", "reference")]
    rows.append(("PSNR (dB)", f"{m['psnr']:.2f} ± {m['psnr_std']:.2f}", "-"))
    if "ssim" in m:
        rows.append(("SSIM", f"{m['ssim']:.4f}", "1 (identity)"))
    rows.append(("L1", f"{m['l1']:.4f}", "0 (identity)"))
    if "rfid" in m:
        other = "0 (identity)"
        if "rfid_other_real" in m:
            other += f"; {m['rfid_other_real']:.4g} (other real images)"
        rows.append((f"rFID ({(result.get('features') or {}).get('name', '?')})", f"{m['rfid']:.4g}", other))
    rows.append(("encode / decode img/s", f"{m['encode_images_per_s']:.0f} / {m['decode_images_per_s']:.0f}", "-"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = head + [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.insert(len(head) + 1, "-" * (w0 + w1 + 16))
    return "\n".join(lines)
