"""Classifier-free guidance (Ho & Salimans 2022) as a model_fn wrapper, with guidance rescale (Lin et al. 2024).

guided = out_u + s (out_c − out_u), so s = 1 is the conditional model and s = 0 the unconditional one (the
CFG paper's (1 + w) ε_c − w ε_u is s = 1 + w). The weights (1 − s, s) sum to one, so guiding the ε, x_0 or
v output gives the same x̂_0 and ε̂ for the same x_t: the wrapper works for every parameterisation.
"""

from __future__ import annotations

from typing import Callable

import torch


def _batch_pair(name: str, cond, uncond, batch: int):
    """Concatenate one conditioning value and its unconditional counterpart along the batch: [cond; uncond]."""
    if cond is None and uncond is None:
        return None
    if torch.is_tensor(cond) and torch.is_tensor(uncond):
        if cond.shape[0] != batch:
            raise ValueError(f"conditioning {name!r} has batch {cond.shape[0]}, x has batch {batch}")
        if uncond.shape[0] == 1 and batch != 1:
            uncond = uncond.expand(batch, *uncond.shape[1:])  # one null embedding for the whole batch
        if uncond.shape != cond.shape:
            raise ValueError(
                f"uncond[{name!r}] has shape {tuple(uncond.shape)}; conditional one has {tuple(cond.shape)}"
            )
        return torch.cat([cond, uncond.to(device=cond.device, dtype=cond.dtype)])
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)):
        if len(uncond) == 1 and batch != 1:
            uncond = list(uncond) * batch
        if len(cond) != batch or len(uncond) != batch:
            raise ValueError(
                f"conditioning {name!r}: lists must have one entry per sample ({batch}), "
                f"got {len(cond)} and {len(uncond)}"
            )
        return list(cond) + list(uncond)
    raise TypeError(
        f"conditioning {name!r}: cond and uncond must both be tensors or both lists, got "
        f"{type(cond).__name__} and {type(uncond).__name__}"
    )


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2024, eqs. 15-16: scale the guided output to the per-sample std of the conditional one,
    then blend: φ · guided·σ_c/σ_cfg + (1 − φ) · guided."""
    dims = list(range(1, guided.ndim))
    std_c = cond.std(dim=dims, keepdim=True)
    std_g = guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return rescale * guided * (std_c / std_g) + (1 - rescale) * guided


def classifier_free_guidance(model_fn: Callable, scale: float, uncond: dict, *, rescale: float = 0.0) -> Callable:
    """Turn ``model_fn(x, t, **cond)`` into a guided ``model_fn(x, t, **cond)``.

    One batched forward pass over [x; x] with [cond; uncond] for every conditioning keyword (tensors are
    concatenated along the batch; an unconditional tensor of batch 1 is broadcast; lists are joined). Only
    the mean channels are guided: with a learned variance the conditional variance channels are kept.
    ``rescale`` = φ of guidance rescale (0 = off; Lin et al. suggest 0.7), applied to the network output.
    """
    if not isinstance(uncond, dict):
        raise TypeError(f"uncond must be a dict of unconditional keyword arguments, got {type(uncond).__name__}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
    scale = float(scale)

    def guided_fn(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        missing = set(cond) ^ set(uncond)
        if missing:
            raise ValueError(f"cond and uncond must name the same keywords; unmatched: {sorted(missing)}")
        both = {k: _batch_pair(k, cond[k], uncond[k], b) for k in cond}
        t = t.expand(b) if t.ndim == 0 else t
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both)  # (2B, C or 2C, ...)
        out_c, out_u = out[:b], out[b:]
        mean_c, mean_u = out_c[:, :c], out_u[:, :c]
        guided = mean_u + scale * (mean_c - mean_u)
        if rescale > 0:
            guided = rescale_guidance(guided, mean_c, rescale)
        if out.shape[1] > c:  # learned variance: keep the conditional variance channels
            guided = torch.cat([guided, out_c[:, c:]], dim=1)
        return guided

    return guided_fn
