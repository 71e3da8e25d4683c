"""The editing layer of :func:`latentdiff.samplers.sample`: img2img, inpainting and the Langevin corrector,
around any sampler, through the grid, the start state and the sampler's ``edit_state`` hook.

- img2img (SDEdit, Meng et al. 2022): only the last ⌈strength · N⌉ points of the grid are run, from
  ``init_image`` noised to the first kept level by q(x_t | x_0) (DDPM eq. 4).
- Inpainting (RePaint, Lugmayr et al. 2022): at the start and after every step the known region is replaced
  by the known image at the state's noise level, √ᾱ known + √(1 − ᾱ) z (RePaint eq. 8), and at the end by the
  known image exactly. RePaint's resampling rounds (``resample_jumps``) are an option of the ddpm and ddim
  samplers themselves, since they repeat a sampler's own step.
- Langevin corrector (predictor-corrector sampling, Song et al. 2021): ``corrector_steps`` Langevin steps at
  the new noise level after every step of the sampler (the predictor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .common import alpha_bars, randn
from .langevin import langevin_correct


def _like(name: str, v, noise: torch.Tensor, *, channels_one: bool = False) -> torch.Tensor:
    """Validate an image-shaped input against the noise: same shape, or batch 1 (broadcast); mask may have 1 channel."""
    if not torch.is_tensor(v):
        raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    ok_c = (noise.shape[1], 1) if channels_one else (noise.shape[1],)
    if (v.ndim != noise.ndim or v.shape[0] not in (noise.shape[0], 1) or v.shape[1] not in ok_c
            or v.shape[2:] != noise.shape[2:]):
        want = f"{tuple(noise.shape)} (or batch 1{', or 1 channel' if channels_one else ''})"
        raise ValueError(f"{name} has shape {tuple(v.shape)}; expected {want}")
    v = v.to(device=noise.device, dtype=noise.dtype)
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v


def paste_known(x: torch.Tensor, ab: float, mask, known, generator) -> torch.Tensor:
    """Replace the known region by the known image at noise level ᾱ: √ᾱ known + √(1 − ᾱ) z (RePaint eq. 8)."""
    known_t = known if ab >= 1.0 else ab**0.5 * known + (1 - ab) ** 0.5 * randn(x, generator)
    return mask * known_t + (1 - mask) * x


def level_timestep(diffusion, ts: torch.Tensor) -> Callable[[float], float]:
    """The function ᾱ -> t for the levels a sampler reaches: the grid point with that ᾱ, else the (fractional)
    timestep of its σ = √((1 − ᾱ)/ᾱ) (the σ-space samplers' intermediate levels, DDIM's ᾱ_0 end)."""
    grid_ab = alpha_bars(diffusion, ts)[:-1]
    grid_t = ts.tolist()

    def t_of(ab: float) -> float:
        for a, t in zip(grid_ab, grid_t):
            if abs(a - ab) <= 1e-9 * max(a, 1e-12):
                return t
        t = float(diffusion.t_of_sigma(((1 - ab) / ab) ** 0.5))
        return float(round(t)) if abs(t - round(t)) < 1e-6 else t

    return t_of


@dataclass(frozen=True)
class Edits:
    """The editing part of a sampling request, validated against the noise (see :meth:`checked`)."""

    init_image: torch.Tensor | None = None  # img2img: the image to start from
    strength: float = 1.0  # img2img: fraction of the grid that is run, in (0, 1]
    mask: torch.Tensor | None = None  # inpainting: 1 = keep ``known``, 0 = generate
    known: torch.Tensor | None = None  # inpainting: the image whose masked region is kept
    corrector_steps: int = 0  # Langevin corrector steps after each step (0 = off)
    snr: float = 0.16  # Langevin step size rule: target signal-to-noise ratio

    @classmethod
    def checked(cls, noise: torch.Tensor, *, init_image, strength, mask, known, resample_jumps, corrector_steps,
                snr) -> Edits:
        """Validate the editing options of ``sample`` and move the images to the noise's device and dtype."""
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        if init_image is None and strength != 1.0:
            raise ValueError("strength < 1 needs init_image (img2img)")
        if (mask is None) != (known is None):
            raise ValueError("inpainting needs both mask and known (or neither)")
        if resample_jumps < 0 or corrector_steps < 0:
            raise ValueError(
                f"resample_jumps and corrector_steps must be >= 0, got {resample_jumps}, {corrector_steps}"
            )
        if resample_jumps and mask is None:
            raise ValueError("resample_jumps (RePaint) only acts with inpainting: pass mask and known")
        if init_image is not None:
            init_image = _like("init_image", init_image, noise)
        if mask is not None:
            mask = _like("mask", mask, noise, channels_one=True)
            known = _like("known", known, noise)
            if mask.min() < 0 or mask.max() > 1:
                raise ValueError("mask values must lie in [0, 1] (1 = keep known)")
        return cls(init_image, strength, mask, known, corrector_steps, snr)

    def trim_grid(self, ts: torch.Tensor, steps: int) -> torch.Tensor:
        """img2img runs only the last ⌈strength · steps⌉ points of the grid."""
        if self.init_image is None:
            return ts
        keep = max(1, math.ceil(round(float(self.strength) * steps, 9)))
        return ts[-keep:]

    def start(self, x: torch.Tensor, diffusion, ts: torch.Tensor, generator) -> torch.Tensor:
        """The start state at ᾱ(ts[0]): x_T, or init_image noised there (img2img), with the known region pasted."""
        if self.init_image is None and self.mask is None:
            return x
        ab0 = float(diffusion.alpha_bar(ts[0]))
        if self.init_image is not None:
            x = ab0**0.5 * self.init_image + (1 - ab0) ** 0.5 * x  # q_sample at the first kept step
        if self.mask is not None:
            x = paste_known(x, ab0, self.mask, self.known, generator)
        return x

    def state_editor(self, model, diffusion, ts: torch.Tensor, generator, *, clip_x0: bool, corrector: bool = True):
        """The sampler's ``edit_state(x, ab_next)`` hook, or None when nothing is edited: the Langevin corrector at
        the new level (unless ``corrector`` is False: the langevin sampler corrects by itself), then the paste."""
        corrector_steps = self.corrector_steps if corrector else 0
        mask, known = self.mask, self.known
        if mask is None and corrector_steps == 0:
            return None
        t_of = level_timestep(diffusion, ts)

        def edit_state(x: torch.Tensor, ab_next) -> torch.Tensor:
            ab_next = float(ab_next)
            if corrector_steps and ab_next < 1.0:
                if mask is not None:
                    x = paste_known(x, ab_next, mask, known, generator)
                x = langevin_correct(model, x, t_of(ab_next), diffusion=diffusion, steps=corrector_steps,
                                     snr=self.snr, generator=generator, clip_x0=clip_x0)
            if mask is not None:
                x = paste_known(x, ab_next, mask, known, generator)
            return x

        return edit_state

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Inpainting ends on exactly the known image where mask = 1."""
        if self.mask is None:
            return x
        return self.mask * self.known + (1 - self.mask) * x
