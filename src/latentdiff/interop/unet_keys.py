"""The U-Net's parameter names in the three layouts, and its config in diffusers' terms.

latentdiff's U-Net keeps the CompVis module tree (``input_blocks``, ``middle_block``, ``output_blocks``), so the
CompVis names (Stable Diffusion single files, prefix ``model.diffusion_model.``) differ from ours inside the
residual blocks and transformer blocks only. diffusers' ``UNet2DConditionModel`` groups the same layers by level
(``down_blocks.L.resnets.j``, ``up_blocks.U.attentions.j``, ...). Every name is derived from the module tree of a
UNet built on the meta device for the config, so no table can drift from the network.

| latentdiff                          | CompVis (SD single file)          | diffusers                         |
| ----------------------------------- | --------------------------------- | --------------------------------- |
| time_embed.0 / .2                   | time_embed.0 / .2                 | time_embedding.linear_1 / _2      |
| input_blocks.0.0                    | input_blocks.0.0                  | conv_in                           |
| ResBlock norm1, conv1               | in_layers.0, in_layers.2          | norm1, conv1                      |
| ResBlock emb_proj                   | emb_layers.1                      | time_emb_proj                     |
| ResBlock norm2, conv2, skip         | out_layers.0, out_layers.3, skip_connection | norm2, conv2, conv_shortcut |
| SpatialTransformer blocks.N         | transformer_blocks.N              | transformer_blocks.N              |
| attn1/attn2.to_out                  | attn1/attn2.to_out.0              | attn1/attn2.to_out.0              |
| ff.geglu.proj, ff.proj_out          | ff.net.0.proj, ff.net.2           | ff.net.0.proj, ff.net.2           |
| Downsample op / Upsample conv       | op / conv                         | downsamplers.0.conv / upsamplers.0.conv |
| out_norm, out_conv                  | out.0, out.2                      | conv_norm_out, conv_out           |
"""

from __future__ import annotations

from ..errors import CheckpointError
from ..nn.attention import SpatialTransformer
from ..nn.layers import Downsample, ResBlock, Upsample
from ..nn.unet import UNet, UNetConfig
from .meta import meta_model

RESBLOCK_COMPVIS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection"}
RESBLOCK_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                      "conv2": "conv2", "skip": "conv_shortcut"}
TOP_COMPVIS = {"out_norm": "out.0", "out_conv": "out.2"}
TOP_DIFFUSERS = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                 "input_blocks.0.0": "conv_in", "out_norm": "conv_norm_out", "out_conv": "conv_out"}


def _transformer_rest(rest: str) -> str:
    """Names inside a spatial transformer, ours -> CompVis and diffusers (the two agree there)."""
    parts = rest.split(".")
    if parts[0] == "blocks":
        parts[0] = "transformer_blocks"
        inner = ".".join(parts[2:])
        inner = {"ff.geglu.proj.weight": "ff.net.0.proj.weight", "ff.geglu.proj.bias": "ff.net.0.proj.bias",
                 "ff.proj_out.weight": "ff.net.2.weight", "ff.proj_out.bias": "ff.net.2.bias"}.get(inner, inner)
        for a in ("attn1", "attn2"):
            inner = inner.replace(f"{a}.to_out.", f"{a}.to_out.0.")
        return ".".join(parts[:2] + [inner])
    return rest


def _layer_rest(layer, rest: str, layout: str) -> str:
    """The name of parameter ``rest`` of ``layer`` (a ResBlock, SpatialTransformer, Down/Upsample) in ``layout``."""
    if isinstance(layer, ResBlock):
        module, leaf = rest.rsplit(".", 1)
        table = RESBLOCK_COMPVIS if layout == "compvis" else RESBLOCK_DIFFUSERS
        return f"{table[module]}.{leaf}"
    if isinstance(layer, SpatialTransformer):
        return _transformer_rest(rest)
    if isinstance(layer, Downsample) and layout == "diffusers":
        return rest.replace("op.", "conv.", 1)
    return rest


def _diffusers_prefixes(unet: UNet) -> dict[str, str]:
    """Our layer prefix (``input_blocks.4.1``) -> diffusers' (``down_blocks.1.attentions.0``)."""
    cfg = unet.config
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    out = {}
    i = 1
    for level in range(levels):
        for j in range(n):
            out[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{j}"
            out[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level != levels - 1:
            out[f"input_blocks.{i}.0"] = f"down_blocks.{level}.downsamplers.0"
            i += 1
    out.update({"middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                "middle_block.2": "mid_block.resnets.1"})
    k = 0
    for up in range(levels):
        for j in range(n + 1):
            block = unet.output_blocks[k]
            out[f"output_blocks.{k}.0"] = f"up_blocks.{up}.resnets.{j}"
            for m, layer in enumerate(block):
                if isinstance(layer, SpatialTransformer):
                    out[f"output_blocks.{k}.{m}"] = f"up_blocks.{up}.attentions.{j}"
                elif isinstance(layer, Upsample):
                    out[f"output_blocks.{k}.{m}"] = f"up_blocks.{up}.upsamplers.0"
            k += 1
    return out


def unet_key_map(config: UNetConfig, layout: str) -> dict[str, str]:
    """Our state-dict key -> its name in ``layout`` ("compvis", without the ``model.diffusion_model.`` prefix,
    or "diffusers"), for every parameter of a UNet with ``config``."""
    unet = meta_model(UNet, config)
    prefixes = _diffusers_prefixes(unet) if layout == "diffusers" else {}
    top = TOP_COMPVIS if layout == "compvis" else TOP_DIFFUSERS
    out = {}
    for key in unet.state_dict():
        module = key.rsplit(".", 1)[0]
        if module in top:
            out[key] = f"{top[module]}.{key.rsplit('.', 1)[1]}"
            continue
        if key.startswith("time_embed."):
            out[key] = key
            continue
        if key.startswith("middle_block."):
            block, pos, rest = key.split(".", 2)  # middle_block, 1, proj_in.weight
            layer, prefix = unet.middle_block[int(pos)], f"{block}.{pos}"
        else:
            block, idx, pos, rest = key.split(".", 3)  # input_blocks, 4, 1, proj_in.weight
            layer, prefix = getattr(unet, block)[int(idx)][int(pos)], f"{block}.{idx}.{pos}"
        new_rest = _layer_rest(layer, rest, layout)
        out[key] = f"{prefixes[prefix] if layout == 'diffusers' else prefix}.{new_rest}"
    return out


# ------------------------------------------------------------------------------------------------------------------
# Configs

# diffusers UNet2DConditionModel settings that latentdiff's U-Net implements only at these values.
_FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
          "conv_in_kernel": 3, "conv_out_kernel": 3, "dual_cross_attention": False, "encoder_hid_dim": None,
          "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
          "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
          "time_embedding_type": "positional", "time_cond_proj_dim": None, "norm_eps": 1e-5,
          "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0, "attention_type": "default",
          "time_embedding_dim": None, "timestep_post_act": None, "cross_attention_norm": None}


def unet_config_from_diffusers(cfg: dict, where: str) -> UNetConfig:
    """The UNetConfig of a diffusers ``unet/config.json`` (SD 1.x, 2.x, inpainting); an architecture latentdiff does
    not express is a CheckpointError that says what was detected."""
    if cfg.get("addition_embed_type") == "text_time" or cfg.get("addition_time_embed_dim"):
        raise CheckpointError(f"{where}: an SDXL U-Net (addition_embed_type 'text_time') was detected; latentdiff "
                              "loads Stable Diffusion 1.x / 2.x U-Nets only")
    for key, value in _FIXED.items():
        if key in cfg and cfg[key] != value and not (key == "only_cross_attention" and cfg[key] in ([False], ())):
            raise CheckpointError(f"{where}: unsupported U-Net architecture: {key}={cfg[key]!r} (latentdiff's U-Net "
                                  f"has {key}={value!r})")
    widths = list(cfg["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise CheckpointError(f"{where}: block_out_channels {widths} are not multiples of the first")
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    attn = [t.startswith("CrossAttn") for t in down]
    if [t.startswith("CrossAttn") for t in reversed(up)] != attn or any(
            t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise CheckpointError(f"{where}: unsupported block types {down} / {up} (latentdiff builds CrossAttnDownBlock2D"
                              " / DownBlock2D levels mirrored by their up blocks)")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")  # diffusers' SD naming: a head count
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise CheckpointError(f"{where}: transformer_layers_per_block {depth} varies by level (SDXL-style); "
                                  "latentdiff has one depth")
        depth = depth[0]
    used = [i for i, a in enumerate(attn) if a] + [len(widths) - 1]  # the middle block always has attention
    if len({heads[i] for i in used}) == 1:
        num_heads, head_channels = heads[used[0]], -1
    else:
        dims = {widths[i] // heads[i] for i in used}
        if len(dims) != 1 or any(widths[i] % heads[i] for i in used):
            raise CheckpointError(f"{where}: attention heads {heads} give unequal head widths; latentdiff needs one "
                                  "head count or one head width")
        num_heads, head_channels = -1, dims.pop()
    in_ch, out_ch = cfg["in_channels"], cfg["out_channels"]
    return UNetConfig(
        in_channels=out_ch, out_channels=out_ch, concat_channels=in_ch - out_ch, model_channels=mc,
        channel_mult=tuple(w // mc for w in widths), num_res_blocks=cfg["layers_per_block"],
        attention_resolutions=tuple(2**i for i, a in enumerate(attn) if a), num_heads=num_heads,
        head_channels=head_channels, context_dim=cfg["cross_attention_dim"], transformer_depth=depth,
        use_linear_proj=bool(cfg.get("use_linear_projection", False)), num_groups=cfg.get("norm_num_groups", 32),
    )  # fmt: skip


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict:
    """The diffusers ``unet/config.json`` fields of a latentdiff UNetConfig; CheckpointError for a U-Net that
    UNet2DConditionModel cannot express (no cross-attention, AdaGN, resampling residual blocks, class labels)."""
    bad = [name for name, on in (("no cross-attention (context_dim null)", cfg.context_dim is None),
                                 ("use_scale_shift_norm", cfg.use_scale_shift_norm),
                                 ("resblock_updown", cfg.resblock_updown),
                                 ("num_classes", cfg.num_classes is not None),
                                 ("adm_in_channels", cfg.adm_in_channels is not None),
                                 ("norm pixel", cfg.norm != "group"),
                                 ("no middle attention", not cfg.mid_attention)) if on]
    if bad:
        raise CheckpointError(f"this U-Net has no diffusers UNet2DConditionModel equivalent: {', '.join(bad)}")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**i in cfg.attention_resolutions for i in range(len(widths))]
    heads = [cfg.num_heads if cfg.head_channels == -1 else w // cfg.head_channels for w in widths]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": cfg.in_channels + cfg.concat_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": cfg.context_dim, "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "use_linear_projection": cfg.use_linear_proj, "transformer_layers_per_block": cfg.transformer_depth,
        "norm_num_groups": cfg.num_groups, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
    }  # fmt: skip
