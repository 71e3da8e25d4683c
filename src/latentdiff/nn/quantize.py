"""Vector quantisation of the VQ-regularised autoencoder (van den Oord et al. 2017, VQ-VAE; LDM's VQ first stage).

Each latent vector z_e is replaced by its nearest codebook entry e_k, k = argmin_j ||z_e − e_j||². The
decoder sees the straight-through estimate z_q = z_e + sg[e_k − z_e] (value e_k, gradient of z_e), and the
losses train the codebook and keep the encoder close to it (VQ-VAE eq. 3, without the reconstruction term):

    L_codebook = ||sg[z_e] − e_k||²        L_commit = ||z_e − sg[e_k]||²        L_vq = L_codebook + β·L_commit

β = 0.25 as in the paper. Codebook health is reported as usage (share of codes hit in the batch) and
perplexity exp(H(p)) of the batch's code histogram p (= the number of codes in use if they were equally used).

Dead codes: an exponential moving average of each code's share of assignments is kept (a buffer); in
training, a code whose share falls below ``dead_threshold`` / n_embed is restarted at a random encoder output
of the current batch. Under torch.distributed the assignment counts are summed over processes and the
restarted rows are broadcast from rank 0, so all replicas keep the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantiser with straight-through gradients, losses, usage statistics and dead-code restarts.

    Args:
        n_embed: codebook size K.
        embed_dim: dimension of each code (the latent channels).
        beta: commitment weight β (0.25 in VQ-VAE and LDM).
        restart_dead: restart codes whose usage EMA falls below ``dead_threshold / n_embed`` (training only).
        usage_decay: decay of the usage EMA per training forward.
        dead_threshold: fraction of the uniform share 1/K under which a code counts as dead.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, *, restart_dead: bool = True,
                 usage_decay: float = 0.99, dead_threshold: float = 0.03):
        super().__init__()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"VectorQuantizer: n_embed and embed_dim must be >= 1, got {n_embed}, {embed_dim}")
        if beta < 0:
            raise ValueError(f"VectorQuantizer: beta must be >= 0, got {beta}")
        self.n_embed, self.embed_dim, self.beta = int(n_embed), int(embed_dim), float(beta)
        self.restart_dead = bool(restart_dead)
        self.usage_decay, self.dead_threshold = float(usage_decay), float(dead_threshold)
        self.embedding = nn.Embedding(self.n_embed, self.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.n_embed, 1.0 / self.n_embed)
        self.register_buffer("usage", torch.full((self.n_embed,), 1.0 / self.n_embed))  # EMA of assignment shares
        self.restarts = 0  # codes restarted so far (in this process)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_flat (N, D): argmin ||z||² − 2 z·e + ||e||²."""
        e = self.embedding.weight.to(z_flat.dtype)
        d = z_flat.pow(2).sum(1, keepdim=True) - 2.0 * z_flat @ e.t() + e.pow(2).sum(1)[None, :]  # (N, K)
        return d.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (B, H, W) as a latent (B, D, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        """Quantise z (B, D, H, W).

        Returns (z_q, info): z_q (B, D, H, W) with straight-through gradient; info holds ``indices`` (B, H, W),
        ``codebook_loss``, ``commitment_loss``, ``vq_loss`` = codebook + β·commitment (scalars),
        ``perplexity`` and ``usage`` (floats, no gradient).
        """
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer: expected (B, {self.embed_dim}, H, W), got {tuple(z.shape)}")
        B, D, H, W = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B·H·W, D)
        with torch.no_grad():
            indices = self.nearest(z_flat.detach().float())
        e = self.embedding(indices).to(z.dtype)  # (B·H·W, D)
        codebook_loss = F.mse_loss(e, z_flat.detach())
        commitment_loss = F.mse_loss(z_flat, e.detach())
        z_q_flat = z_flat + (e - z_flat).detach()  # straight-through: value e, gradient flows to z
        z_q = z_q_flat.reshape(B, H, W, D).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)

        with torch.no_grad():
            counts = torch.bincount(indices, minlength=self.n_embed).float()
            if self.training and _distributed():
                dist.all_reduce(counts)
            p = counts / counts.sum().clamp_min(1.0)
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
            usage = (counts > 0).float().mean()
            if self.training:
                self.usage.mul_(self.usage_decay).add_(p, alpha=1.0 - self.usage_decay)
                if self.restart_dead:
                    self._restart_dead_codes(z_flat.detach())
        info = {
            "indices": indices.reshape(B, H, W),
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "perplexity": float(perplexity),
            "usage": float(usage),
        }
        return z_q, info

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor) -> int:
        """Move codes whose usage EMA is below threshold/K onto random encoder outputs of this batch."""
        dead = torch.nonzero(self.usage < self.dead_threshold / self.n_embed).flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)
        rows = z_flat[pick].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(rows, 0)
        self.embedding.weight.data[dead] = rows
        self.usage[dead] = 1.0 / self.n_embed
        self.restarts += int(dead.numel())
        return int(dead.numel())
