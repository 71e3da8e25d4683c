"""Tiny untrained model folders for the serve tests (built from configs, saved, in well under a second each):
a text-conditioned pixel model (16x16 RGB), a class-conditional one (8x8 digits), a latent text model (an
untrained KL-f4 first stage) and one conditioned on a segmentation map."""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.config import load_config
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from latentdiff.nn.tokenizer import WordTokenizer
from latentdiff.pipeline import Pipeline

CAPTIONS = ["a red circle at the top left", "a blue square in the centre", "a green triangle at the bottom right"]
SAMPLE = "sample: {sampler: ddim, steps: 4, guidance: 2.0, num: 2, batch_size: 2, clip_x0: CLIP}"
TEXT = """
model: {preset: tiny}
diffusion: {schedule: scaled_linear, num_steps: 50, prediction: v}
data: {name: shapes, size: 16, channels: 3}
conditioning: {kind: text, text: {width: 16, depth: 1, heads: 2}}
"""
CLASS = """
model: {preset: tiny, num_classes: 10}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: digits, size: 8, channels: 1}
"""
SEGMENTATION = """
model: {preset: tiny}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: shapes, size: 16, channels: 3}
conditioning: {kind: null, mode: concat, concat: segmentation, concat_options: {classes: 24}}
"""


def _build(folder: Path, text: str, *, clip: bool = True, tokenizer=None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder.parent / f"{folder.name}.yaml"
    sample = SAMPLE.replace("CLIP", "true" if clip else "false")
    if "segmentation" in text:
        sample = sample.replace("guidance: 2.0", "guidance: 1.0")
    cfg.write_text(text + sample + "\n")
    pipe = Pipeline.from_config(load_config(cfg), tokenizer=tokenizer)
    for p in pipe.unet.parameters():  # untrained but not zero: the output layers start at zero otherwise
        p.data.add_(0.02 * torch.randn_like(p))
    return pipe.save(folder)


def text_model(folder: Path) -> Path:
    return _build(folder, TEXT, tokenizer=WordTokenizer.build(CAPTIONS))


def class_model(folder: Path) -> Path:
    return _build(folder, CLASS)


def segmentation_model(folder: Path) -> Path:
    return _build(folder, SEGMENTATION)


def latent_text_model(folder: Path) -> Path:
    """A text model on 4x4x4 latents of an untrained KL-f4 autoencoder (16x16 RGB images)."""
    torch.manual_seed(1)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       z_channels=4, embed_dim=4))
    first_stage = folder.parent / f"{folder.name}_first_stage"
    save_autoencoder(ae, str(first_stage), latent_scale=0.5)
    text = TEXT + f"latent: {{first_stage: {first_stage}}}\n"
    return _build(folder, text, clip=False, tokenizer=WordTokenizer.build(CAPTIONS))
