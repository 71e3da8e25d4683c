"""The denoising U-Net ε_θ(x_t, t [, y, context, concat]) of DDPM, improved DDPM / ADM and LDM.

Ho et al. 2020 (appendix B): a PixelCNN++-style U-Net of wide residual blocks with GroupNorm, self-attention
at chosen resolutions, skip connections from every down-path stage to the up path, and the timestep given
by a transformer sinusoid embedding. Dhariwal & Nichol 2021 add AdaGN (``use_scale_shift_norm``), residual
blocks that resample (``resblock_updown``), several heads and class embeddings. Rombach et al. 2022 (LDM,
section 3.3) replace attention by spatial transformers that cross-attend to a context τ_θ(y), and feed
spatially aligned conditions (masks, low-resolution images) by concatenation to the input.

The module tree mirrors the CompVis / OpenAI ``UNetModel`` (input_blocks, middle_block, output_blocks,
time_embed, label_emb, out) so that Stable Diffusion 1.x/2.x and CompVis LDM checkpoints load by a key map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..dataclass_io import FromDict, update
from .attention import AttentionBlock, SpatialTransformer
from .layers import (
    NORMS,
    Downsample,
    ResBlock,
    SinusoidalEmbedding,
    Upsample,
    group_norm,
    group_norm_silu,
    zero_module,
)


@dataclass
class UNetConfig(FromDict):
    in_channels: int = 3  # channels of x_t (image or latent); concatenated conditions come on top
    out_channels: int = 3  # output channels: C for ε / x0 / v, 2C with a learned variance
    model_channels: int = 128  # base width; level i has model_channels * channel_mult[i] channels
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per resolution level; downsample between
    num_res_blocks: int = 2  # residual blocks per level on the down path (one more per level on the up path)
    attention_resolutions: tuple[int, ...] = (2,)  # downsampling factors with attention: (2,) = at 1/2 size
    num_heads: int = 1  # attention heads (used when head_channels == -1)
    head_channels: int = -1  # channels per head (heads = width // head_channels; wins over num_heads); -1 = unused
    dropout: float = 0.0  # dropout inside residual blocks (DDPM CIFAR-10: 0.1)
    use_scale_shift_norm: bool = False  # AdaGN: the timestep embedding scales and shifts the second norm (ADM)
    resblock_updown: bool = False  # residual blocks that down/upsample instead of plain strided conv / upsample
    num_classes: int | None = None  # class-conditional: embedding of num_classes + 1 rows, the last = null class
    adm_in_channels: int | None = None  # vector-conditional: y (B, adm_in_channels) -> Linear-SiLU-Linear, added to emb
    context_dim: int | None = None  # width of the cross-attention context; set = spatial transformers (LDM)
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    use_linear_proj: bool = False  # spatial transformer proj_in/out as Linear (SD 2.x) instead of 1x1 conv
    concat_channels: int = 0  # extra input channels of concatenated conditions (mask, low-res image, ...)
    use_checkpoint: bool = False  # gradient checkpointing of every block (less memory, ~30% more compute)
    num_groups: int = 32  # GroupNorm groups; must divide every width
    mid_attention: bool = True  # attention between the middle block's two ResBlocks (every published U-Net);
    #                             False: none, so a U-Net without attention_resolutions is fully convolutional
    norm: str = "group"  # "group": GroupNorm (every published U-Net); "pixel": each position normalised over its
    #                      channels (nn/layers.py PixelNorm), so no statistic spans the latent and a larger canvas
    #                      is denoised as its parts would be

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions"):  # YAML gives lists: store tuples
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
                raise ValueError(f"UNetConfig.{name} must be a sequence of integers, got {value!r}")
            setattr(self, name, tuple(value))
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ValueError(f"UNetConfig.num_groups must be a positive integer, got {self.num_groups!r}")
        if self.norm not in NORMS:
            raise ValueError(f"UNetConfig.norm must be {' or '.join(NORMS)}, got {self.norm!r}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}")
        reachable = [2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in reachable]
        if bad:
            raise ValueError(
                f"UNetConfig.attention_resolutions {bad} are not downsampling factors of this UNet; "
                f"with {len(self.channel_mult)} levels they are {reachable}"
            )
        if self.concat_channels < 0:
            raise ValueError(f"UNetConfig.concat_channels must be >= 0, got {self.concat_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ValueError(f"UNetConfig.num_classes must be None or a positive integer, got {self.num_classes}")
        if self.adm_in_channels is not None:
            if not isinstance(self.adm_in_channels, int) or self.adm_in_channels <= 0:
                raise ValueError(
                    f"UNetConfig.adm_in_channels must be None or a positive integer, got {self.adm_in_channels!r}"
                )
            if self.num_classes is not None:
                raise ValueError("UNetConfig: num_classes and adm_in_channels both set; y is a class id or a vector")
        if self.context_dim is not None and self.context_dim <= 0:
            raise ValueError(f"UNetConfig.context_dim must be None or a positive integer, got {self.context_dim}")
        if self.num_heads == -1 and self.head_channels == -1:
            raise ValueError("UNetConfig: set num_heads or head_channels (both are -1)")
        for name in ("num_heads", "head_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or (value <= 0 and value != -1):
                raise ValueError(f"UNetConfig.{name} must be a positive integer or -1 (unused), got {value!r}")
        for width in {self.model_channels * m for m in self.channel_mult} | {self.model_channels}:
            if width % self.num_groups:
                raise ValueError(
                    f"UNetConfig: width {width} is not divisible by num_groups={self.num_groups}; "
                    "pick num_groups dividing model_channels * every channel_mult"
                )

    @property
    def groups(self) -> int | None:
        """What every normalisation layer is built with: the GroupNorm groups, or None for per-pixel norms."""
        return self.num_groups if self.norm == "group" else None

    @property
    def downsampling_factor(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


class UNetBlock(nn.ModuleList):
    """A sequence of layers; ResBlocks receive the embedding, spatial transformers the context."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, use_checkpoint: bool = False):
        for layer in self:
            if isinstance(layer, ResBlock):
                args = (h, emb)
            elif isinstance(layer, SpatialTransformer):
                args = (h, context)
            else:
                args = (h,)
            if use_checkpoint and isinstance(layer, (ResBlock, AttentionBlock, SpatialTransformer)):
                h = checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        return h


class UNet(nn.Module):
    """forward(x, t, *, y=None, context=None, concat=None) -> (B, out_channels, H, W).

    x: (B, in_channels, H, W), H and W multiples of ``config.downsampling_factor`` (any size, any aspect).
    t: (B,) timesteps 0..T-1, long or float (a 0-d tensor or number is broadcast to the batch).
    y: (B,) long class ids in [0, num_classes]; y == num_classes is the null class (classifier-free guidance).
       With ``adm_in_channels`` instead: y is a (B, adm_in_channels) float vector (LDM's ``adm`` mode).
    context: (B, L, context_dim) tokens for cross-attention. concat: (B, concat_channels, H, W).

    ``channels_last_inference`` (default True): without autograd on a CPU, run the feature maps in channels_last
    memory layout, where oneDNN's convolutions are ~10% faster (benchmarks/unet_throughput.py); the output comes
    back in the usual layout. Training keeps NCHW, which is faster there. Not part of the config or checkpoints.
    """

    channels_last_inference: bool = True

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet expects a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        mc, g = cfg.model_channels, cfg.groups
        emb_dim = 4 * mc
        self.time_proj = SinusoidalEmbedding(mc)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        if cfg.adm_in_channels is not None:  # SDXL's "sequential" label_emb: keys label_emb.0.0.*, label_emb.0.2.*
            adm = nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.label_emb = nn.Sequential(adm)

        def resblock(ch_in, ch_out, **kw):
            return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.use_scale_shift_norm, num_groups=g, **kw)

        def attention(ch):
            if cfg.context_dim is None:
                return AttentionBlock(ch, cfg.num_heads, cfg.head_channels, g)
            return SpatialTransformer(
                ch, cfg.num_heads, cfg.head_channels, cfg.transformer_depth, cfg.context_dim,
                use_linear_proj=cfg.use_linear_proj, num_groups=g,
            )  # fmt: skip

        # Down path: conv_in, then per level num_res_blocks x (ResBlock [+ attention]), then a downsampler.
        conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, mc, 3, padding=1)
        self.input_blocks = nn.ModuleList([UNetBlock([conv_in])])
        skip_widths, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(UNetBlock(layers))
                skip_widths.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = resblock(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(UNetBlock([down]))
                skip_widths.append(ch)
                ds *= 2

        middle = [resblock(ch, ch), attention(ch)] if cfg.mid_attention else [resblock(ch, ch)]
        self.middle_block = UNetBlock([*middle, resblock(ch, ch)])

        # Up path: per level num_res_blocks + 1 x (ResBlock on [h, skip] [+ attention]), then an upsampler.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_widths.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(layers))

        self.out_norm = group_norm(ch, g)
        self.out_conv = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self._check_inputs(x, t, y, context, concat)
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, in + concat channels, H, W)
        channels_last = self.channels_last_inference and x.device.type == "cpu" and not torch.is_grad_enabled()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # same values, NHWC strides
        w = self.time_embed[0].weight
        emb = self.time_embed(self.time_proj(t).to(w.dtype))  # (B, 4C)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y if y.dtype in (torch.int64, torch.int32) else y.to(w.dtype))
        emb = F.silu(emb)  # the SiLU every ResBlock would apply first, done once
        ckpt = self.config.use_checkpoint and self.training and torch.is_grad_enabled()

        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context, ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, ckpt)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, ckpt)  # (B, C + C_skip, H, W)
        out = self.out_conv(group_norm_silu(h, self.out_norm))
        return out.contiguous() if channels_last else out

    def _check_inputs(self, x, t, y, context, concat) -> torch.Tensor:
        """Clear errors for wrong shapes / missing conditions; returns t as a (B,) tensor."""
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        b, c, hgt, wid = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, this UNet expects in_channels={cfg.in_channels}")
        f = cfg.downsampling_factor
        if hgt % f or wid % f:
            raise ValueError(
                f"input size {hgt}x{wid} is not divisible by {f} (this UNet downsamples {len(cfg.channel_mult) - 1} "
                f"times); use a size that is a multiple of {f}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) (one timestep per sample), got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer or float tensor, got {t.dtype}")
        self._check_y(y, b)
        if cfg.context_dim is None:
            if context is not None:
                raise ValueError("context was given but this UNet has no cross-attention (context_dim=None)")
        else:
            if context is None:
                raise ValueError(f"context is required: this UNet cross-attends to (B, L, {cfg.context_dim}) tokens")
            if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
                raise ValueError(f"context must be ({b}, L, {cfg.context_dim}), got {tuple(context.shape)}")
        if cfg.concat_channels == 0:
            if concat is not None:
                raise ValueError("concat was given but this UNet takes no concatenated channels (concat_channels=0)")
        else:
            want = (b, cfg.concat_channels, hgt, wid)
            if concat is None:
                raise ValueError(f"concat is required: this UNet expects a {want} tensor of extra input channels")
            if tuple(concat.shape) != want:
                raise ValueError(f"concat must have shape {want}, got {tuple(concat.shape)}")
        return t

    def _check_y(self, y, b: int) -> None:
        """Clear errors for a missing, unexpected or misshapen y (an ADM vector or class ids) for a batch of b."""
        cfg = self.config
        if cfg.adm_in_channels is not None:
            want = (b, cfg.adm_in_channels)
            if y is None:
                raise ValueError(f"y is required: this UNet adds a {want} vector y to its time embedding")
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != want or not y.is_floating_point():
                got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"y must be a {want} float tensor (adm_in_channels), got {got}")
        elif cfg.num_classes is None:
            if y is not None:
                raise ValueError("y was given but this UNet is not class-conditional (num_classes=None)")
        else:
            if y is None:
                raise ValueError(
                    f"y is required: this UNet is class-conditional (num_classes={cfg.num_classes}); "
                    f"pass y={cfg.num_classes} (the null class) for unconditional samples"
                )
            if y.shape != (b,) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"y must be a ({b},) long tensor of class ids, got {tuple(y.shape)} {y.dtype}")
            # Range check on CPU only: on an accelerator it would force a device sync every call.
            if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
                got = f"[{int(y.min())}, {int(y.max())}]"
                raise ValueError(f"y must hold class ids in [0, {cfg.num_classes}], got range {got}")


# --------------------------------------------------------------------------------------------------------------
# Presets

PRESETS: dict[str, UNetConfig] = {
    # For unit tests (~0.18M parameters).
    "tiny": UNetConfig(
        in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(2,), num_heads=2, num_groups=8,
    ),
    # 8x8 or 16x16 one-channel digits (scikit-learn's); fast on a CPU; class-conditional (num_classes=None
    # for unconditional). ~1.8M parameters.
    "digits": UNetConfig(
        in_channels=1, out_channels=1, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(2,), num_heads=4, dropout=0.1, use_scale_shift_norm=True, num_classes=10,
        num_groups=8,
    ),
    # The DDPM CIFAR-10 model (Ho et al. 2020, appendix B): 35.7M parameters.
    "cifar10": UNetConfig(
        in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(2,), num_heads=1, dropout=0.1,
    ),
    # A small latent-diffusion U-Net for 4-channel latents (e.g. 16x16 or 32x32) with cross-attention at
    # 1/2 and 1/4 of the latent size (set context_dim to the conditioner's width). ~10.9M parameters.
    "ldm_small": UNetConfig(
        in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(2, 4), head_channels=32, context_dim=256, transformer_depth=1,
        use_linear_proj=True, use_scale_shift_norm=True,
    ),
    # Stable Diffusion 1.x and 2.x U-Nets (for loading their checkpoints; too big to train on a CPU).
    "sd1": UNetConfig(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(1, 2, 4), num_heads=8, context_dim=768, transformer_depth=1,
    ),
    "sd2": UNetConfig(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(1, 2, 4), num_heads=-1, head_channels=64, context_dim=1024, transformer_depth=1,
        use_linear_proj=True,
    ),
}  # fmt: skip


def unet_from_preset(name: str, **overrides) -> UNet:
    """UNet of the preset ``name`` with fields replaced by ``overrides`` (checked like a config file's)."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known: {', '.join(PRESETS)}")
    return UNet(update(PRESETS[name], overrides, where=f"UNet preset {name!r}"))
