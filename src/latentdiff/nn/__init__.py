"""latentdiff.nn: the networks. They know nothing about schedules or samplers.

unet (the ADM/LDM U-Net), attention and layers (its blocks), autoencoder / quantize / discriminator / lpips
(the first stage and its losses), inception (the FID feature network).
"""

from .attention import AttentionBlock, CrossAttention, SpatialTransformer
from .layers import Downsample, ResBlock, SinusoidalEmbedding, Upsample, group_norm, group_norm_silu, zero_module
from .unet import PRESETS as UNET_PRESETS
from .unet import UNet, UNetConfig, unet_from_preset

__all__ = [
    "AttentionBlock", "CrossAttention", "Downsample", "ResBlock", "SinusoidalEmbedding", "SpatialTransformer",
    "UNET_PRESETS", "UNet", "UNetConfig", "Upsample", "group_norm", "group_norm_silu", "unet_from_preset",
    "zero_module",
]
