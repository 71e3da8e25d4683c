"""Start a run from another model's weights: fine-tuning, and a new task's extra input channels zero-initialised.

Stable Diffusion's inpainting model started from its text-to-image model with the 5 new input channels of the
first convolution (mask + masked-image latent) set to zero, so that at step 0 it computes exactly what the
text-to-image model computes, and learns to use the new inputs from there. :func:`init_from_model` does this for
any pair of models whose networks match except for the U-Net's input channels.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def _copy(target: torch.nn.Module, source: torch.nn.Module, what: str, where: str, widen: str | None = None) -> int:
    """Copy every tensor of ``source`` into ``target``; ``widen`` names a conv weight whose extra input channels in
    ``target`` are zeroed. Returns the number of tensors copied; a missing or mismatched one is a ConfigError."""
    mine, theirs = target.state_dict(), source.state_dict()
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    if missing or extra:
        raise ConfigError(f"train.init_from {where}: its {what} has other parameters than this model's "
                          f"(missing {missing[:5]}, unexpected {extra[:5]})")
    out = {}
    for key, value in theirs.items():
        want = mine[key].shape
        if key == widen and value.shape != want and value.shape[1] < want[1] and value.shape[2:] == want[2:]:
            wide = torch.zeros(want, dtype=value.dtype)
            wide[:, : value.shape[1]] = value  # the new input channels (the concat condition) start at zero
            out[key] = wide
        elif value.shape != want:
            raise ConfigError(f"train.init_from {where}: {what} parameter {key} has shape {tuple(value.shape)}, "
                              f"this model's {tuple(want)}")
        else:
            out[key] = value
    target.load_state_dict(out)
    return len(out)


def init_from_model(pipe, source, where: str) -> str:
    """Load ``source``'s U-Net (and conditioner) weights into ``pipe`` (both Pipelines); the U-Net's extra concat
    input channels start at zero. Returns a one-line summary."""
    conv_name = next(n for n, p in pipe.unet.named_parameters() if p.dim() == 4)  # conv_in: (out, in + concat, 3, 3)
    n = _copy(pipe.unet, source.unet, "U-Net", where, widen=conv_name)
    mine = pipe.conditioner is not None and any(True for _ in pipe.conditioner.parameters())
    theirs = source.conditioner is not None and any(True for _ in source.conditioner.parameters())
    if mine and theirs:
        n += _copy(pipe.conditioner, source.conditioner, "conditioner", where)
    elif mine or theirs:
        which = "this model's" if mine else "its"
        raise ConfigError(f"train.init_from {where}: only {which} conditioner has weights (a text or class encoder, a "
                          "rescaler); start from a model with the same conditioning")
    added = pipe.unet.config.concat_channels - source.unet.config.concat_channels
    return f"initialised from {where}: {n} tensors" + (f", {added} new input channels at zero" if added else "")
