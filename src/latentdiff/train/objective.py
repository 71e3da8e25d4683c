"""What the loop trains: an objective holds the models, says which optimizer updates which, and computes losses.

The loop (loop.py) knows nothing about diffusion or autoencoders; it only sees this protocol.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from ..resample import UniformSampler


@runtime_checkable
class Objective(Protocol):
    """The contract between the training loop and what it trains.

    models:     name -> nn.Module, everything trained or saved. The loop may replace entries by wrapped
                versions (DDP); call ``self.models[name]`` at use, unwrap with ``getattr(m, "module", m)``.
    optimizers: optimizer name -> names of the models whose parameters it updates (stepped in this order).
    ema:        names of the models whose exponential moving average the loop keeps and saves.
    losses(batch, step) -> ({optimizer name: scalar loss}, {name: float to log}).
    Optional: state_dict()/load_state_dict() (saved in checkpoints), sample_images(models, num, generator)
    -> (N, C, H, W) in [-1, 1] for periodic sample grids.
    """

    models: dict[str, nn.Module]
    optimizers: dict[str, list[str]]
    ema: list[str]

    def losses(self, batch: dict, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over all processes (itself when not distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class DiffusionObjective:
    """Train a denoising network with a GaussianDiffusion's loss (L_simple, hybrid or L_vlb).

    Args:
        model: the network, called as model(x_t, t, *, y=..., context=..., concat=...).
        diffusion: a GaussianDiffusion; its ``training_losses`` gives the loss and its ``timestep_sampler``
            draws t (importance sampling of improved DDPM is fed with each batch's losses).
        cond_key: batch key of the condition, or None (unconditional). An integer (B,) tensor is a class label
            passed as ``y``; a float (B, L, D) tensor is a context passed as ``context``.
        num_classes: classes of the labels; the null class id for classifier-free guidance is ``num_classes``.
        cond_drop_prob: probability of replacing a sample's condition by the null one during training
            (label -> num_classes, context -> ``null_context``), so the model also learns p(x) for guidance.
        null_context: (L, D) or (1, L, D) context that stands for "no condition"; needed to drop contexts.
        image_key: batch key of the images.
        spatial: a ``latentdiff.spatial.SpatialCondition`` (with a conditioner in mode concat or hybrid): the
            tensor it makes from the batch's fields (a segmentation map, a low-resolution image, ...) goes through
            the conditioner (its rescaler) and is concatenated to x_t; dropped only with ``drop_concat``.
        latent_encoder: optional frozen callable image -> latent (LDM); diffusion then runs on its output.
        latent_decoder: optional callable latent -> image, used only for sample grids.
        conditioner: optional τ_θ (``nn.conditioners.Conditioner``) trained jointly with the U-Net (LDM sec. 3.3):
            ``batch[cond_key]`` (captions, list[str], or class ids) goes through it, dropped to its null condition
            (the empty prompt, the null class) with ``cond_drop_prob``; it is optimized and averaged (EMA) with
            the U-Net, as network "cond".
        latent_scale: s of cached latents: a batch with ``latent_mean`` (and ``latent_std``: a KL posterior) holds
            unscaled ℰ(x) from ``data.latent_cache``; the diffusion runs on z = s·(mean + std·ε) and the encoder
            is never called.
        sample_sampler, sample_steps: sampler and steps of :meth:`sample_images`.
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion,
        *,
        cond_key: str | None = "label",
        num_classes: int | None = None,
        cond_drop_prob: float = 0.0,
        null_context: torch.Tensor | None = None,
        image_key: str = "image",
        spatial=None,
        latent_encoder: Callable | None = None,
        latent_decoder: Callable | None = None,
        sample_sampler: str = "ddim",
        sample_steps: int = 50,
        conditioner: nn.Module | None = None,
        latent_scale: float | None = None,
    ):
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if cond_drop_prob > 0 and cond_key is None:
            raise ValueError("cond_drop_prob > 0 needs a cond_key: there is no condition to drop")
        if cond_drop_prob > 0 and num_classes is None and null_context is None and conditioner is None:
            raise ValueError("cond_drop_prob > 0 needs num_classes (labels, null class = num_classes) "
                             "or null_context (contexts)")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.models = {"unet": model}
        self.optimizers = {"model": ["unet"]}
        self.ema = ["unet"]
        self.conditioner = conditioner  # the raw module: drop() and null_like() need no parameters
        if conditioner is not None:
            self.models["cond"] = conditioner
            self.optimizers = {"model": ["unet", "cond"]}
            self.ema = ["unet", "cond"]
        self.latent_scale = latent_scale
        self.diffusion = diffusion
        self.cond_key, self.num_classes, self.cond_drop_prob = cond_key, num_classes, float(cond_drop_prob)
        self.null_context = None if null_context is None else torch.as_tensor(null_context)
        if self.null_context is not None and self.null_context.ndim == 2:
            self.null_context = self.null_context[None]  # (1, L, D)
        if spatial is not None and conditioner is None:
            raise ValueError("a spatial condition enters through a conditioner (mode concat or hybrid); give one")
        self.image_key, self.spatial = image_key, spatial
        self.latent_encoder, self.latent_decoder = latent_encoder, latent_decoder
        self.sample_sampler, self.sample_steps = sample_sampler, int(sample_steps)
        self._sample_shape: tuple | None = None
        self._sample_cond: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------------

    def _diffused(self, batch: dict) -> torch.Tensor:
        """x_0 of the diffusion: s·z from cached latents (a fresh KL posterior sample, from the global RNG that
        checkpoints save), else the encoded images (the images themselves in pixel space)."""
        if "latent_mean" in batch:
            if self.latent_scale is None:
                raise ValueError("a batch of cached latents needs latent_scale")
            z = batch["latent_mean"]
            if "latent_std" in batch:
                z = z + batch["latent_std"] * torch.randn_like(z)
            return z * self.latent_scale
        if self.image_key not in batch:
            raise ValueError(f"batch has no {self.image_key!r} (image_key); keys: {', '.join(batch)}")
        return self._encode(batch[self.image_key])

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.latent_encoder
        if enc is None:
            return x
        if isinstance(enc, nn.Module):
            enc.to(x.device).eval()
        with torch.no_grad():
            return enc(x)

    def _condition(self, batch: dict, B: int, device) -> tuple[dict, dict]:
        """Model kwargs with conditioning dropout applied, and the same without dropout (kept for sample grids)."""
        cond = {}
        if self.conditioner is not None:
            return self._conditioner_kwargs(batch, B, device)
        if self.cond_key is not None:
            if self.cond_key not in batch:
                raise ValueError(f"batch has no {self.cond_key!r} (cond_key); keys: {', '.join(batch)}")
            c = batch[self.cond_key]
            if not torch.is_tensor(c):
                raise TypeError(f"batch[{self.cond_key!r}] must be a tensor (labels or contexts), "
                                f"got {type(c).__name__}")
            if c.is_floating_point():
                if c.ndim != 3 or c.shape[0] != B:
                    raise ValueError(f"context batch[{self.cond_key!r}] must be (B, L, D) with B={B}, "
                                     f"got {tuple(c.shape)}")
                cond["context"] = c
            else:
                if c.shape != (B,):
                    raise ValueError(f"labels batch[{self.cond_key!r}] must have shape ({B},), got {tuple(c.shape)}")
                if self.num_classes is not None and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
                    raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {int(c.min())}..{int(c.max())}")
                cond["y"] = c.long()
        clean = dict(cond)
        if self.cond_drop_prob > 0:
            drop = torch.rand(B, device=device) < self.cond_drop_prob  # (B,) bool
            if "y" in cond:
                if self.num_classes is None:
                    raise ValueError("dropping labels needs num_classes (the null class id)")
                cond["y"] = torch.where(drop, torch.full_like(cond["y"], self.num_classes), cond["y"])
            if "context" in cond:
                if self.null_context is None:
                    raise ValueError("dropping contexts needs null_context")
                null = self.null_context.to(device=device, dtype=cond["context"].dtype)
                if null.shape[1:] != cond["context"].shape[1:]:
                    raise ValueError(f"null_context has shape {tuple(null.shape[1:])}, "
                                     f"contexts {tuple(cond['context'].shape[1:])}")
                cond["context"] = torch.where(drop[:, None, None], null, cond["context"])
        return cond, clean

    def _conditioner_kwargs(self, batch: dict, B: int, device) -> tuple[dict, dict]:
        """U-Net kwargs from the conditioner, with conditioning dropout; the clean conditions are kept (not their
        encodings) so that sample grids encode them with the EMA conditioner."""
        kind, conds = self.conditioner.kind, {}
        if kind is not None:
            if self.cond_key not in batch:
                raise ValueError(f"batch has no {self.cond_key!r} (cond_key); keys: {', '.join(batch)}")
            c = batch[self.cond_key]
            if kind == "text":
                if isinstance(c, str) or len(c) != B:
                    raise ValueError(f"batch[{self.cond_key!r}] must be a list of {B} captions")
                conds["prompt"] = list(c)
            elif kind == "layout":  # (B, K, 5) objects [class, x0, y0, x1, y1]
                conds["layout"] = torch.as_tensor(c, device=device).float()
            else:
                conds["label"] = torch.as_tensor(c, device=device).long()
        extra = {}
        if self.spatial is not None:  # its concat input, and a label it feeds the U-Net (a noise level) as y
            extra = self.spatial.inputs(batch, encode=self._encode, training=True)
            conds["concat"] = extra.pop("concat").to(device)
            extra = {k: v.to(device) for k, v in extra.items()}
        clean = dict(conds)
        if self.cond_drop_prob > 0:
            drop = torch.rand(B, device=device) < self.cond_drop_prob  # (B,) bool
            conds = self.conditioner.drop(conds, drop)
        return {**self.models["cond"](conds), **extra}, {"conditions": clean, **extra}

    def losses(self, batch: dict, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Mean diffusion loss of a batch; the per-sample losses also update the timestep sampler."""
        x0 = self._diffused(batch)
        B = x0.shape[0]
        cond, clean = self._condition(batch, B, x0.device)
        self._sample_shape = tuple(x0.shape[1:])
        self._sample_cond = {k: _head(v, 64) for k, v in clean.items()}
        model = self.models["unet"]
        terms = self.diffusion.training_losses(lambda x, t, **c: model(x, t, **c), x0, **cond)
        sampler = self.diffusion.timestep_sampler
        if not isinstance(sampler, UniformSampler):
            # Unweighted per-sample losses of every process, so all processes keep the same history.
            raw = terms.get("mse", 0) + terms.get("vlb", 0)
            sampler.update(_all_gather(terms["t"].detach()), _all_gather(raw.detach().float()))
        logs = {k: terms[k].detach().mean().item() for k in ("mse", "vlb") if k in terms}
        return {"model": terms["loss"].mean()}, logs

    def state_dict(self) -> dict:
        return {"timestep_sampler": self.diffusion.timestep_sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.diffusion.timestep_sampler.load_state_dict(state.get("timestep_sampler", {}))

    @torch.no_grad()
    def sample_images(self, models: dict, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` samples for a progress grid: labels 0, 1, 2, ... cycled; contexts/concat inputs from the
        last training batch. Uses the sampling entry point ``latentdiff.samplers.sample``."""
        from ..samplers import sample as run_sampler  # above train/ in no way: samplers are a lower layer

        if self._sample_shape is None:
            raise ValueError("sample_images needs the data shape: call losses() on a batch first")
        model = models["unet"]
        device = next(model.parameters()).device
        noise = torch.randn((num, *self._sample_shape), generator=generator).to(device)
        cond = {}
        for k, v in self._sample_cond.items():
            if k == "conditions":  # captions or class ids of the last batch, encoded by the (EMA) conditioner
                cond.update(models["cond"]({n: _cycled(c, num) for n, c in v.items()}))
            elif k == "y" and self.num_classes is not None:
                cond["y"] = torch.arange(num, device=device) % self.num_classes
            else:
                cond[k] = _cycled(v, num).to(device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        x0 = run_sampler(lambda x, t, **c: model(x, t, **c), noise, diffusion=self.diffusion,
                         sampler=self.sample_sampler, steps=self.sample_steps, seed=seed, **cond)
        if self.latent_decoder is not None:
            x0 = self.latent_decoder(x0)
        return x0.clamp(-1, 1)


def _head(v, n: int):
    """The first ``n`` entries of a tensor (detached), a list, or each value of a dict of those."""
    if isinstance(v, dict):
        return {k: _head(x, n) for k, x in v.items()}
    return v[:n].detach() if torch.is_tensor(v) else list(v[:n])


def _cycled(v, num: int):
    """``num`` entries of a tensor or list, cycling through it."""
    if torch.is_tensor(v):
        return v[torch.arange(num, device=v.device) % v.shape[0]]
    return [v[i % len(v)] for i in range(num)]
