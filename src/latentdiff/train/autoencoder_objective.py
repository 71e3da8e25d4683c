"""The first-stage objective of LDM (Rombach et al. 2022, sec. 3.1 and app. G; Esser et al. 2021, VQGAN eq. 4–7).

Autoencoder loss (optimizer "autoencoder")::

    L_AE = L_rec + w_p·LPIPS(x, x̂) + λ·f_d·L_G + L_reg
    L_rec = |x − x̂| (l1) or (x − x̂)² (l2), averaged over pixels
    L_G   = −mean D(x̂)                                           generator side of the hinge GAN
    λ     = w_d · ||∇_{G_L} (L_rec + w_p·LPIPS)|| / (||∇_{G_L} L_G|| + 1e-4), clamped to [0, 1e4], no gradient
            (G_L = the decoder's last layer; VQGAN eq. 7)
    L_reg = kl_weight · KL(q(z|x) || N(0, I)) / (C·H·W)           KL models (KL summed over the latent)
          = codebook_weight · (L_codebook + β·L_commit)          VQ models (nn/quantize.py)

Discriminator loss (optimizer "discriminator"), hinge: L_D = f_d · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂))).
f_d = disc_factor once ``step >= disc_start``, else 0 (the adversarial term is off and D is not trained).

Scale: LDM sums the pixel loss and the KL over each image; here both are divided by C·H·W, which keeps their
ratio (so ``kl_weight = 1e-6`` means what it means in LDM's configs) and makes the logged losses per-pixel.
LDM's learned output log-variance is left out (it starts at 0, where it is the identity).

The loop sees only ``models``, ``optimizers``, ``ema`` and ``losses``; this file never touches optimizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DISC_LOSSES, REC_LOSSES, AutoencoderLossConfig  # noqa: F401  (re-exported: the loss weights)
from ..eval.metrics import psnr, ssim  # noqa: F401  (psnr and ssim are also imported from here)
from ..nn.autoencoder import Autoencoder, compute_latent_scale, save_autoencoder


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_G|| + 1e-4), clamped to [0, max_weight], detached (VQGAN eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if _distributed():  # λ of the global batch: the gradient of its mean loss is the mean over the processes
        import torch.distributed as dist

        both = torch.stack([rec_grad, g_grad])
        dist.all_reduce(both)
        rec_grad, g_grad = both / dist.get_world_size()
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E relu(1 − D(x)) + E relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E softplus(−D(x)) + E softplus(D(x̂))): the non-saturating GAN's discriminator loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class AutoencoderObjective:
    """Objective of the first stage for the training loop.

    Args:
        autoencoder: a KL or VQ :class:`Autoencoder`.
        discriminator: a patch discriminator, or None (no adversarial term, a single optimizer).
        lpips: a frozen perceptual net called as lpips(x, x̂) -> (B,), or None (perceptual term off).
        config: an AutoencoderLossConfig (or a dict of its fields).
    """

    def __init__(self, autoencoder: Autoencoder, discriminator: nn.Module | None = None, lpips: nn.Module | None = None,
                 config: AutoencoderLossConfig | dict | None = None):
        if not isinstance(getattr(autoencoder, "module", autoencoder), Autoencoder):
            raise TypeError(f"autoencoder must be an Autoencoder, got {type(autoencoder).__name__}")
        if isinstance(config, dict):
            config = AutoencoderLossConfig.from_dict(config)
        self.config = config or AutoencoderLossConfig()
        self.models: dict[str, nn.Module] = {"autoencoder": autoencoder}
        self.optimizers: dict[str, list[str]] = {"autoencoder": ["autoencoder"]}
        if discriminator is not None:
            self.models["discriminator"] = discriminator
            self.optimizers["discriminator"] = ["discriminator"]
        self.ema: list[str] = []
        self.lpips = lpips
        if lpips is not None:
            lpips.requires_grad_(False).eval()
        self._reference: torch.Tensor | None = None  # first images seen, for sample_images

    # -- the loss --------------------------------------------------------------------------------------------

    def _raw(self, name: str) -> nn.Module:
        m = self.models[name]
        return getattr(m, "module", m)

    def losses(self, batch: dict, step: int):
        cfg = self.config
        x = batch[cfg.image_key] if isinstance(batch, dict) else batch
        if self._reference is None:
            self._reference = x[:64].detach().cpu()
        ae = self.models["autoencoder"]
        raw_ae = self._raw("autoencoder")
        if raw_ae.config.regularizer == "kl":
            x_rec, info = ae(x, sample=cfg.sample_posterior)
        else:
            x_rec, info = ae(x)
        per_pixel = (x - x_rec).abs() if cfg.rec_loss == "l1" else (x - x_rec).pow(2)
        rec_loss = per_pixel.mean()
        logs = {"rec_loss": float(rec_loss.detach()), "psnr": float(psnr(x_rec.detach().clamp(-1, 1), x).mean())}
        nll = rec_loss
        if self.lpips is not None and cfg.perceptual_weight > 0:
            self.lpips.to(x.device)
            p_loss = self.lpips(x.contiguous(), x_rec.contiguous()).mean()
            nll = nll + cfg.perceptual_weight * p_loss
            logs["p_loss"] = float(p_loss.detach())
        if raw_ae.config.regularizer == "kl":
            kl = info["kl"].mean()
            reg = cfg.kl_weight * kl / x[0].numel()
            logs["kl"] = float(kl.detach())
        else:
            reg = cfg.codebook_weight * info["vq_loss"]
            logs.update(vq_loss=float(info["vq_loss"].detach()), perplexity=info["perplexity"], usage=info["usage"],
                        restarts=float(raw_ae.quantize.restarts))
        loss_ae = nll + reg
        losses = {"autoencoder": loss_ae}

        if "discriminator" in self.models:
            disc = self.models["discriminator"]
            f_d = cfg.disc_factor if step >= cfg.disc_start else 0.0
            if f_d > 0:
                g_loss = -disc(x_rec.contiguous()).mean()
                if torch.is_grad_enabled() and x_rec.requires_grad:
                    lam = adaptive_weight(nll, g_loss, raw_ae.last_layer, cfg.max_adaptive_weight)  # VQGAN eq. 7
                    d_weight = lam * cfg.disc_weight
                else:  # no graph (evaluation): λ is undefined, the term is left out
                    d_weight = torch.zeros((), device=x.device)
                losses["autoencoder"] = loss_ae + d_weight * f_d * g_loss
                logs.update(g_loss=float(g_loss.detach()), d_weight=float(d_weight))
            if f_d == 0 and not _distributed():  # D off and no DDP graph to keep identical: skip its passes
                losses["discriminator"] = torch.zeros((), device=x.device, requires_grad=True)
                logs.update(d_loss=0.0)
                return losses, logs
            # Under DDP, D is called even while f_d = 0 (every process must run the same graph); it stays untrained.
            logits_real = disc(x.detach().contiguous())
            logits_fake = disc(x_rec.detach().contiguous())
            d_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
            losses["discriminator"] = f_d * d_fn(logits_real, logits_fake)
            logs.update(d_loss=float(losses["discriminator"].detach()), logits_real=float(logits_real.detach().mean()),
                        logits_fake=float(logits_fake.detach().mean()))
        return losses, logs

    # -- optional hooks of the loop ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample_images(self, models: dict, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Originals (first half) and their reconstructions (second half) of the first images seen in training."""
        if self._reference is None:
            raise ValueError("sample_images needs a batch first: call losses() at least once")
        ae = models["autoencoder"]
        ae = getattr(ae, "module", ae)
        n = max(1, min(num // 2, self._reference.shape[0]))
        device = next(ae.parameters()).device
        x = self._reference[:n].to(device)
        x_rec = ae(x, sample=False)[0] if ae.config.regularizer == "kl" else ae(x)[0]
        return torch.cat([x, x_rec.clamp(-1, 1)])

    def export(self, folder: str, images: torch.Tensor, generator: torch.Generator | None = None) -> float:
        """Compute the latent scale (1/std of the latents of ``images``, LDM's scale_by_std) and save the
        autoencoder folder with it. Returns the scale."""
        ae = self._raw("autoencoder")
        device = next(ae.parameters()).device
        scale = compute_latent_scale(ae, images.to(device), generator)
        save_autoencoder(ae, folder, latent_scale=scale)
        return scale

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, batch_size: int = 64) -> dict:
        """Mean PSNR (dB), SSIM (eval.metrics: Gaussian window) and L1 of reconstructions (posterior mean for KL
        models) of ``images``."""
        ae = self._raw("autoencoder")
        was = ae.training
        ae.eval()
        device = next(ae.parameters()).device
        p, s, l1 = [], [], []
        try:
            for xb in images.split(batch_size):
                xb = xb.to(device)
                rec = ae.decode(ae.encode(xb)).clamp(-1, 1)
                p.append(psnr(rec, xb).cpu())
                s.append(ssim(rec, xb).cpu())
                l1.append((rec - xb).abs().flatten(1).mean(1).cpu())
        finally:
            ae.train(was)
        return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean()),
                "l1": float(torch.cat(l1).mean())}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
