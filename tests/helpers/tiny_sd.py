"""Tiny random Stable Diffusion folders in the diffusers layout, built the way diffusers' own pipeline tests build
theirs (block widths (32, 64), a 1,000-token CLIP text model, a BPE tokenizer whose files the test writes), with
every parameter randomised (norms included) so that a parity test sees every weight."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYOUTS = ("sd1", "sd2", "inpaint")


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every vector parameter random values (norm weights 1 ± 0.2, biases ±0.1, norm biases included); weight
    matrices keep their random default initialisation. Then a swapped or unmapped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    return module


def write_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with a small vocabulary: the byte-level alphabet plus a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    # The byte-level alphabet of GPT-2 style BPE: printable bytes stand for themselves, the others are shifted
    # past 255, so every byte has a visible character.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "s q", "o n</w>"]
    for m in merges:
        tok = m.replace(" ", "")
        if tok not in vocab:
            vocab.append(tok)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))


def build(folder, layout: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny diffusers folder of ``layout`` (sd1: ε-prediction, conv projections; sd2: v-prediction, linear
    projections, per-level heads; inpaint: the 9-channel U-Net) with random weights; returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    sd2 = layout == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=9 if layout == "inpaint" else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    )  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
    ))  # fmt: skip
    for i, m in enumerate((unet, vae, text)):
        randomise(m, seed * 10 + i)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="v_prediction" if sd2 else "epsilon",
        timestep_spacing="leading",
    )  # fmt: skip
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    cls = "StableDiffusionInpaintPipeline" if layout == "inpaint" else "StableDiffusionPipeline"
    index = {"_class_name": cls, "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
