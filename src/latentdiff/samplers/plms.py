"""PLMS: the pseudo linear multi-step sampler of Liu et al. 2022 (PNDM), in the form Stable Diffusion uses.

Each step is the DDIM transfer φ(x_t, ε, t -> t-1) (PNDM eq. 9, which equals DDIM eq. 12 with η = 0) fed
with a linear-multistep combination of the last ε predictions (Adams-Bashforth, PNDM eq. 12):
order 1: ε_0; 2: (3ε_0 − ε_1)/2; 3: (23ε_0 − 16ε_1 + 5ε_2)/12; 4: (55ε_0 − 59ε_1 + 37ε_2 − 9ε_3)/24.
The first step, with no history yet, is a second-order (Heun) step: predict x_{t-1} with ε(x_t), evaluate
ε there, and redo the transfer with the average (the "skip_prk_steps" start of diffusers' PNDMScheduler).
A grid of N points therefore costs N + 1 model calls (N for N = 1).
"""

from __future__ import annotations

import torch

from ..diffusion import x0_eps_from_output
from .common import alpha_bars, check_timesteps, denoise, model_t
from .ddim import ddim_step

# Adams-Bashforth weights, newest first (PNDM eq. 12 and its lower-order starts).
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def multistep_eps(history: list) -> torch.Tensor:
    """The Adams-Bashforth combination of the last (up to 4) ε predictions; ``history`` is oldest first."""
    order = min(len(history), 4)
    weights = AB_WEIGHTS[order]
    return sum(w * e for w, e in zip(weights, reversed(history[-order:])))


def transfer(x: torch.Tensor, eps: torch.Tensor, ab: float, ab_prev: float):
    """φ(x_t, ε, t -> t-1) of PNDM eq. 9, written as DDIM: x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t, then eq. 12."""
    x0, _ = x0_eps_from_output("eps", eps, x, ab**0.5, (1 - ab) ** 0.5)
    return ddim_step(x0, eps, ab_prev), x0


@torch.no_grad()
def sample_plms(
    model_fn,
    x: torch.Tensor,
    timesteps,
    *,
    diffusion,
    generator=None,  # unused: PLMS is deterministic
    callback=None,
    clip_x0: bool = False,
    edit_state=None,
    set_alpha_to_one: bool = True,  # end at ᾱ = 1; False ends at ᾱ_0 (diffusers' PNDMScheduler default)
    combine: str = "eps",  # what the multistep combines: ε (each output converted where it was made) or the raw
    # network outputs, converted to ε at the step's own x_t (diffusers' PNDMScheduler; differs for v / x_0 models)
) -> torch.Tensor:
    """Fourth-order pseudo linear multi-step sampling (Liu et al. 2022, Algorithm 2 with a Heun start)."""
    if combine not in ("eps", "output"):
        raise ValueError(f"combine must be 'eps' or 'output', got {combine!r}")
    if combine == "output" and diffusion.prediction != "eps":
        return _plms_on_outputs(model_fn, x, timesteps, diffusion=diffusion, callback=callback, clip_x0=clip_x0,
                                edit_state=edit_state, set_alpha_to_one=set_alpha_to_one)
    ts = check_timesteps(timesteps, diffusion)
    final = 1.0 if set_alpha_to_one else float(diffusion.alphas_cumprod[0])
    ab_grid = alpha_bars(diffusion, ts, final)
    grid = ts.tolist()
    history: list[torch.Tensor] = []  # ε at each grid point, oldest first (at most 4 kept)
    for i, t in enumerate(grid):
        ab, ab_prev = ab_grid[i], ab_grid[i + 1]
        _, eps = denoise(model_fn, x, t, diffusion, clip_x0=clip_x0)
        history = (history + [eps])[-4:]
        if i == 0 and len(grid) > 1:
            # Heun start: Euler predictor to the next grid point, ε there, then the averaged ε.
            x_pred, _ = transfer(x, eps, ab, ab_prev)
            _, eps_pred = denoise(model_fn, x_pred, grid[1], diffusion, clip_x0=clip_x0)
            eps_step = (eps + eps_pred) / 2
        else:
            eps_step = multistep_eps(history)
        x, x0 = transfer(x, eps_step, ab, ab_prev)
        if edit_state is not None:
            x = edit_state(x, ab_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _plms_on_outputs(model_fn, x, timesteps, *, diffusion, callback, clip_x0, edit_state, set_alpha_to_one):
    """PLMS whose Adams-Bashforth combination runs on the raw network outputs (v or x̂_0), converted to ε at the
    current x_t only for the transfer: diffusers' PNDMScheduler for v-prediction models."""
    ts = check_timesteps(timesteps, diffusion)
    final = 1.0 if set_alpha_to_one else float(diffusion.alphas_cumprod[0])
    ab_grid = alpha_bars(diffusion, ts, final)
    grid = ts.tolist()
    pred = diffusion.prediction

    def to_eps(out, x_t, ab):
        return x0_eps_from_output(pred, out, x_t, ab**0.5, (1 - ab) ** 0.5, clip_x0=clip_x0)[1]

    history: list[torch.Tensor] = []  # raw outputs at each grid point, oldest first (at most 4 kept)
    for i, t in enumerate(grid):
        ab, ab_prev = ab_grid[i], ab_grid[i + 1]
        out = model_fn(x, model_t(t, x))
        history = (history + [out])[-4:]
        if i == 0 and len(grid) > 1:
            x_pred, _ = transfer(x, to_eps(out, x, ab), ab, ab_prev)
            out_pred = model_fn(x_pred, model_t(grid[1], x_pred))
            out_step = (out + out_pred) / 2
        else:
            out_step = multistep_eps(history)
        x, x0 = transfer(x, to_eps(out_step, x, ab), ab, ab_prev)
        if edit_state is not None:
            x = edit_state(x, ab_prev)
        if callback is not None:
            callback(i, t, x, x0)
    return x
