"""The first stage's (KL autoencoder's) parameter names: latentdiff = CompVis, and diffusers' AutoencoderKL.

latentdiff's autoencoder uses the CompVis names (``encoder.down.0.block.0.norm1``; SD single files prefix them with
``first_stage_model.``). diffusers renames levels and blocks, numbers the decoder's levels from the deepest, and
stores the middle attention's q, k, v and output as linear layers (CompVis: 1x1 convolutions).

| latentdiff / CompVis                | diffusers                                   |
| ----------------------------------- | ------------------------------------------- |
| encoder.down.L.block.j              | encoder.down_blocks.L.resnets.j             |
| encoder.down.L.downsample.conv      | encoder.down_blocks.L.downsamplers.0.conv   |
| decoder.up.L.block.j                | decoder.up_blocks.(n−1−L).resnets.j         |
| decoder.up.L.upsample.conv          | decoder.up_blocks.(n−1−L).upsamplers.0.conv |
| mid.block_1 / mid.block_2           | mid_block.resnets.0 / .1                    |
| mid.attn_1.norm, q, k, v, proj_out  | mid_block.attentions.0.group_norm, to_q, to_k, to_v, to_out.0 (2-D weights) |
| nin_shortcut                        | conv_shortcut                               |
| norm_out                            | conv_norm_out                               |
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..nn.autoencoder import AutoencoderConfig

_RENAMES = (("nin_shortcut", "conv_shortcut"), ("mid.block_1", "mid_block.resnets.0"),
            ("mid.block_2", "mid_block.resnets.1"), ("mid.attn_1.norm", "mid_block.attentions.0.group_norm"),
            ("mid.attn_1.q.", "mid_block.attentions.0.to_q."), ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
            ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
            ("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0"), ("norm_out", "conv_norm_out"),
            (".downsample.", ".downsamplers.0."), (".upsample.", ".upsamplers.0."), (".block.", ".resnets."))


def vae_key_to_diffusers(key: str, levels: int) -> str:
    """Our (CompVis) autoencoder key -> diffusers AutoencoderKL key."""
    for a, b in _RENAMES:
        key = key.replace(a, b)
    if key.startswith("encoder.down."):
        key = "encoder.down_blocks." + key[len("encoder.down."):]
    elif key.startswith("decoder.up."):
        level, rest = key[len("decoder.up."):].split(".", 1)
        key = f"decoder.up_blocks.{levels - 1 - int(level)}.{rest}"
    return key


def is_attention_matrix(key: str) -> bool:
    """Whether ``key`` is a mid-attention q/k/v/out weight (1x1 conv in CompVis, linear in diffusers)."""
    return "mid.attn_1." in key and key.endswith("weight") and ".norm." not in key


def vae_config_from_diffusers(cfg: dict, where: str) -> AutoencoderConfig:
    """The AutoencoderConfig of a diffusers ``vae/config.json`` (the SD first stage)."""
    down, up = list(cfg.get("down_block_types", [])), list(cfg.get("up_block_types", []))
    if any(t != "DownEncoderBlock2D" for t in down) or any(t != "UpDecoderBlock2D" for t in up):
        raise CheckpointError(f"{where}: unsupported autoencoder blocks {down} / {up} (latentdiff's first stage "
                              "has DownEncoderBlock2D / UpDecoderBlock2D levels)")
    if cfg.get("shift_factor") or cfg.get("latents_mean") or cfg.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"{where}: unsupported autoencoder (shift_factor / latents_mean / act_fn: an SD3, Flux "
                              "or other non-SD first stage)")
    if not cfg.get("use_quant_conv", True) or not cfg.get("use_post_quant_conv", True):
        raise CheckpointError(f"{where}: an autoencoder without quant_conv / post_quant_conv is not supported")
    widths = list(cfg["block_out_channels"])
    f = 2 ** (len(widths) - 1)
    size = int(cfg.get("sample_size") or 256)
    return AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        resolution=size if size % f == 0 else f * 32, ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=cfg["layers_per_block"], attn_resolutions=(),
        mid_attention=cfg.get("mid_block_add_attention", True), z_channels=cfg["latent_channels"],
        embed_dim=cfg["latent_channels"], regularizer="kl", norm_groups=cfg.get("norm_num_groups", 32),
    )  # fmt: skip


def vae_config_to_diffusers(cfg: AutoencoderConfig, scale: float) -> dict:
    """The diffusers ``vae/config.json`` of a latentdiff KL autoencoder (CheckpointError for VQ, attention in the
    levels, a z_channels != embed_dim or per-pixel norms, which AutoencoderKL cannot express)."""
    if cfg.regularizer != "kl" or cfg.attn_resolutions or cfg.z_channels != cfg.embed_dim or cfg.norm != "group":
        raise CheckpointError("this first stage has no diffusers AutoencoderKL equivalent (it needs a KL autoencoder "
                              "without attention in its levels, z_channels == embed_dim and GroupNorm)")
    widths = [cfg.ch * m for m in cfg.ch_mult]
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths),
            "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
            "latent_channels": cfg.embed_dim, "norm_num_groups": cfg.norm_groups, "sample_size": cfg.resolution,
            "scaling_factor": float(scale), "mid_block_add_attention": cfg.mid_attention, "force_upcast": True}
