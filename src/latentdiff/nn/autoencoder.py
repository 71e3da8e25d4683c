"""The first stage of latent diffusion (Rombach et al. 2022, sec. 3.1): an autoencoder x → z → x̂.

Encoder and decoder are stacks of residual blocks, one level per entry of ``ch_mult``; the encoder halves the
resolution between levels and the decoder doubles it, so the downsampling factor is f = 2^(len(ch_mult) − 1)
(f = 1, 2, 4, 8, 16, 32). Self-attention follows the residual blocks at the resolutions in
``attn_resolutions`` and always sits in the middle block. Two regularisers of the latent space:

- ``kl``: the encoder outputs mean and log-variance of a diagonal Gaussian posterior q(z|x); training adds a
  small KL(q(z|x) || N(0, I)) (the objective's ``kl_weight``); diffusion uses a sample (or the mode).
- ``vq``: the latent is vector-quantised against a learned codebook (nn/quantize.py); as in LDM, ``encode``
  returns the continuous pre-quantisation latent and ``decode`` quantises it first.

Parameter names follow the CompVis/Stable Diffusion first stage (``encoder.down.0.block.0.norm1`` ...,
``quant_conv``, ``post_quant_conv``, ``quantize.embedding``) and the layers match its conventions: GroupNorm(32,
eps 1e-6), downsampling by asymmetric (0, 1, 0, 1) padding then a stride-2 3x3 convolution, nearest upsampling
then a 3x3 convolution, attention with 1x1-conv q, k, v and proj_out. A published checkpoint therefore loads
by name (SD 1.x: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z_channels 4, latent scale 0.18215).

Save/load: a folder with ``config.json`` (the config and the latent scale) and ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dataclass_io import FromDict
from ..errors import CheckpointError, MissingFileError
from ..fileio import atomic_write, atomic_write_text
from ..folders import AE_CONFIG_FILE as CONFIG_FILE
from ..folders import AE_FORMAT as FORMAT
from ..folders import WEIGHTS_FILE, check_config_seal, check_safetensors, seal_metadata, seal_safetensors
from .layers import NORMS, group_norm
from .quantize import VectorQuantizer

REGULARIZERS = ("kl", "vq")


@dataclass
class AutoencoderConfig(FromDict):
    in_channels: int = 3            # image channels
    out_channels: int = 3           # reconstructed channels
    resolution: int = 32            # training image side: places attn_resolutions; must be divisible by f
    ch: int = 64                    # base channel count (level i has ch * ch_mult[i] channels)
    ch_mult: tuple = (1, 2, 2)      # one entry per level; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2         # residual blocks per level in the encoder (decoder: one more)
    attn_resolutions: tuple = ()    # feature-map sides at which each residual block is followed by self-attention
    mid_attention: bool = True      # attention block in the middle (always on in CompVis/SD)
    dropout: float = 0.0            # dropout inside residual blocks
    z_channels: int = 3             # encoder output channels (KL: doubled for mean and log-variance)
    embed_dim: int = 3              # latent channels after quant_conv: what the diffusion model sees
    regularizer: str = "kl"         # "kl" (diagonal Gaussian posterior) or "vq" (vector quantiser)
    n_embed: int = 512              # VQ: codebook size
    vq_beta: float = 0.25           # VQ: commitment weight β
    vq_restart_dead: bool = True    # VQ: restart dead codes with encoder outputs during training
    norm_groups: int = 32           # GroupNorm groups (SD: 32); must divide every channel count
    norm: str = "group"             # "group": GroupNorm over (channels of a group) x (all positions), SD's; "pixel":
    #                                 each position normalised over its channels alone (ConvNeXt's channel LayerNorm),
    #                                 so no statistic spans the image and a large canvas is processed exactly as
    #                                 its parts would be (away from the border)

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown autoencoder regularizer {self.regularizer!r}; "
                             f"expected one of {', '.join(REGULARIZERS)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"autoencoder ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        for name in ("in_channels", "out_channels", "resolution", "ch", "z_channels", "embed_dim", "n_embed",
                     "norm_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"autoencoder {name} must be a positive int, got {v!r}")
        if self.num_res_blocks < 0:
            raise ValueError(f"autoencoder num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.resolution % self.f:
            raise ValueError(f"autoencoder downsampling factor f={self.f} does not divide resolution {self.resolution}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"autoencoder norm_groups={self.norm_groups} does not divide channel counts {bad}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"autoencoder dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"autoencoder norm must be one of {', '.join(NORMS)}, got {self.norm!r}")

    @property
    def groups(self) -> int | None:
        """What every normalisation layer is built with: the GroupNorm groups, or None for per-pixel norms."""
        return self.norm_groups if self.norm == "group" else None

    @property
    def f(self) -> int:
        """Downsampling factor between image and latent."""
        return 2 ** (len(self.ch_mult) - 1)


def config_for_factor(f: int, **overrides) -> AutoencoderConfig:
    """A config with downsampling factor f (1, 2, 4, ...): ch_mult (1, 2, 2, 4, 4, 4) cut to log2(f) + 1 levels."""
    levels = int(round(math.log2(f))) if f >= 1 else -1
    if f < 1 or 2**levels != f:
        raise ValueError(f"autoencoder downsampling factor must be a power of two >= 1, got {f}")
    mult = (1, 2, 2, 4, 4, 4, 4, 4)[: levels + 1]
    return AutoencoderConfig(**{"ch_mult": mult, **overrides})


def Normalize(channels: int, groups: int | None) -> nn.Module:
    """GroupNorm(groups, channels) with SD's autoencoder eps, or with ``groups`` None a :class:`PixelNorm`."""
    return group_norm(channels, groups, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; GroupNorm, SiLU, dropout, 3x3 conv; plus the input (1x1 conv if channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q, k, v and output by 1x1 convolutions; residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C) each
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        a = a.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """Halve the resolution: pad right and bottom by one, then a 3x3 convolution with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, cfg: AutoencoderConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.groups, cfg.dropout)
    mid.attn_1 = AttnBlock(channels, cfg.groups) if cfg.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.groups, cfg.dropout)
    return mid


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → (B, out_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        self.num_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, c_in = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg.groups, cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg.groups))
            if i != self.num_levels - 1:
                level.downsample = Downsample(c_in)
                res //= 2
            self.down.append(level)
        self.mid = _middle(c_in, cfg)
        self.norm_out = Normalize(c_in, cfg.groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) → (B, out_channels, h·f, w·f). ``up[i]`` is level i, run from the deepest up."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.num_levels = len(cfg.ch_mult)
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.f
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in, cfg)
        levels = [None] * self.num_levels
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            c_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, c_out, cfg.groups, cfg.dropout))
                c_in = c_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(c_in, cfg.groups))
            if i != 0:
                level.upsample = Upsample(c_in)
                res *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in, cfg.groups)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """q(z|x) = N(μ, diag σ²) from ``moments`` (B, 2C, h, w) = [μ, log σ²] (log σ² clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I) (reparameterised: gradients reach μ and σ)."""
        dev = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=dev, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over latent dimensions: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class Autoencoder(nn.Module):
    """KL- or VQ-regularised autoencoder. ``latent_scale`` (LDM's scale_by_std) is saved with it."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"Autoencoder expects an AutoencoderConfig, got {type(config).__name__}")
        self.config = cfg = config
        kl = cfg.regularizer == "kl"
        self.encoder = Encoder(cfg, 2 * cfg.z_channels if kl else cfg.z_channels)
        self.decoder = Decoder(cfg)
        moments = 2 if kl else 1  # KL: mean and log-variance
        self.quant_conv = nn.Conv2d(moments * cfg.z_channels, moments * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        if not kl:
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.vq_beta, restart_dead=cfg.vq_restart_dead)
        self.latent_scale: float | None = None  # 1 / std of the latents (compute_latent_scale); None = not computed
        self.training_data: dict | None = None  # the data section it was trained on (saved with it), if known

    @property
    def f(self) -> int:
        return self.config.f

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last convolution (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of this size."""
        self._check_size(height, width)
        return self.config.embed_dim, height // self.f, width // self.f

    def _check_size(self, height: int, width: int):
        if height % self.f or width % self.f:
            raise ValueError(f"autoencoder downsampling factor f={self.f} does not divide the image size "
                             f"{height}x{width}")

    def _check_image(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"autoencoder expects images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[2], x.shape[3])

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(x)): KL moments (B, 2·embed_dim, h, w) or the VQ pre-quantisation latent
        (B, embed_dim, h, w)."""
        self._check_image(x)
        return self.quant_conv(self.encoder(x))

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        if self.config.regularizer != "kl":
            raise ValueError("posterior() needs a KL autoencoder; this one is VQ-regularised")
        return DiagonalGaussian(self.encode_moments(x))

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent z (B, embed_dim, H/f, W/f), unscaled: KL posterior mode (or a sample), VQ pre-quantisation latent."""
        if self.config.regularizer == "kl":
            post = self.posterior(x)
            return post.sample(generator) if sample else post.mode()
        return self.encode_moments(x)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """x̂ (B, out_channels, h·f, w·f) from an unscaled latent; a VQ model quantises z first unless
        ``quantize=False``."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"autoencoder.decode expects latents (B, {self.config.embed_dim}, h, w), "
                             f"got {tuple(z.shape)}")
        if self.config.regularizer == "vq" and quantize:
            z, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruct x. Returns (x̂, info): KL: info["kl"] (B,), info["posterior"]; VQ: the quantiser's info."""
        if self.config.regularizer == "kl":
            post = self.posterior(x)
            z = post.sample(generator) if sample else post.mode()
            return self.decoder(self.post_quant_conv(z)), {"kl": post.kl(), "posterior": post}
        z_q, info = self.quantize(self.encode_moments(x))
        return self.decoder(self.post_quant_conv(z_q)), info


@torch.no_grad()
def compute_latent_scale(autoencoder: Autoencoder, images: torch.Tensor,
                         generator: torch.Generator | None = None) -> float:
    """LDM's scale_by_std: 1 / std of the latents of one batch (KL: posterior samples), so scaled latents have
    unit variance."""
    model = getattr(autoencoder, "module", autoencoder)
    was_training = model.training
    model.eval()
    try:
        z = model.encode(images, sample=model.config.regularizer == "kl", generator=generator)
    finally:
        model.train(was_training)
    std = float(z.float().flatten().std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; cannot compute a latent scale")
    return 1.0 / std


def save_autoencoder(autoencoder: Autoencoder, folder: str, latent_scale: float | None = None,
                     data: dict | None = None) -> None:
    """Write ``folder/config.json`` (config, latent scale, and the data section it was trained on when known:
    ``data`` or the model's ``training_data``) and ``folder/model.safetensors``, each atomically."""
    from safetensors.torch import save_file

    model = getattr(autoencoder, "module", autoencoder)
    scale = latent_scale if latent_scale is not None else model.latent_scale
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": 1, "config": model.config.to_dict(),
            "latent_scale": None if scale is None else float(scale)}
    data = data if data is not None else getattr(model, "training_data", None)
    if data is not None:
        meta["data"] = dict(data)
    cfg_path = os.path.join(folder, CONFIG_FILE)
    atomic_write_text(cfg_path, json.dumps(meta, indent=2))

    def write(p):  # sealed: the weights carry the sha256 of their tensors and of config.json, checked by load
        save_file(state, p, metadata=seal_metadata({"format": FORMAT}, config=cfg_path))
        seal_safetensors(p)

    atomic_write(os.path.join(folder, WEIGHTS_FILE), write)
    if latent_scale is not None:
        model.latent_scale = float(latent_scale)


def load_autoencoder(folder: str, map_location: str | torch.device = "cpu") -> Autoencoder:
    """Load a folder written by :func:`save_autoencoder`; missing or corrupt files raise errors naming them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isdir(folder):
        raise MissingFileError(f"autoencoder folder not found: {folder}")
    cfg_path, w_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise MissingFileError(f"autoencoder file missing: {p}")
    check_config_seal(w_path, cfg_path)
    try:
        with open(cfg_path) as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt autoencoder config {cfg_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_path} is not a latentdiff autoencoder config "
                              f"(format {FORMAT!r} with a 'config' object)")
    model = Autoencoder(AutoencoderConfig.from_dict(meta["config"], where=cfg_path, prefix="config."))
    scale = meta.get("latent_scale")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise CheckpointError(f"{cfg_path}: latent_scale must be a positive number or null, got {scale!r}")
    model.latent_scale = None if scale is None else float(scale)
    data = meta.get("data")
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path}: data must be a mapping (the data section the autoencoder was trained "
                              f"on), got {data!r}")
    model.training_data = data
    try:
        state = load_file(w_path, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt autoencoder weights {w_path}: {e}") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{w_path} does not match the config: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise CheckpointError(f"{w_path}: tensor shapes differ from the config for {wrong[:5]}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{w_path}: non-finite values (NaN/inf) in {bad[:5]}")
    check_safetensors(w_path)  # a flipped byte that still parses is an error naming the file, not a wrong model
    model.load_state_dict(state)
    return model.to(map_location)
