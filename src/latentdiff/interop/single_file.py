"""Original Stable Diffusion single files in and out: ``.safetensors`` (or ``.ckpt``, read only through
``torch.load(weights_only=True)``, never a full unpickle) in the CompVis key layout:

- ``model.diffusion_model.*``: the U-Net (CompVis names; unet_keys.py), with EMA copies under ``model_ema.*``
  (the name without its dots) that are used when present;
- ``first_stage_model.*``: the autoencoder (latentdiff's names);
- ``cond_stage_model.transformer.*`` (SD 1.x, transformers' CLIP names) or ``cond_stage_model.model.*`` (SD 2.x,
  OpenCLIP names; the last block is dropped: SD 2.x conditions on the penultimate one).

A single file holds no configs. latentdiff's exporter writes its configs and the tokenizer's files into the
safetensors metadata, so its files load alone. A third-party file's architecture is read from the tensor shapes;
its attention heads follow SD 1.x (8 heads, context 768) or SD 2.x (64 channels per head, context 1024); its
prediction type is ε for SD 1.x and v for SD 2.x unless ``prediction=`` says otherwise; its tokenizer comes from
``tokenizer=`` (a folder of vocab.json and merges.txt) or a ``tokenizer/`` folder beside the file.
"""

from __future__ import annotations

import json
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingFileError
from ..fileio import atomic_write
from ..nn.autoencoder import AutoencoderConfig
from ..nn.unet import UNet, UNetConfig
from ..pipeline import Pipeline
from .assemble import assemble, build_autoencoder, build_unet
from .clip import (
    HF_PREFIX,
    IGNORED,
    OPENCLIP_PREFIX,
    ClipConditioner,
    load_tokenizer,
    openclip_to_transformers,
    text_config_from_state,
    text_model_from_state,
)
from .meta import meta_model
from .schedulers import diffusion_options, sampler_options, to_scheduler_config
from .unet_keys import unet_key_map

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
META_KEY = "latentdiff"
# Keys of CompVis training state that carry no weights the pipeline needs.
HARMLESS = ("model_ema.decay", "model_ema.num_updates", "betas", "alphas_cumprod", "alphas_cumprod_prev",
            "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
            "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
            "cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection")
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000, "skip_prk_steps": True, "set_alpha_to_one": False,
                "steps_offset": 1, "timestep_spacing": "leading"}


def read_single_file(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors or .ckpt file; every failure is one CheckpointError naming the file."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt: {e})") from None
    if path.suffix in (".ckpt", ".pt", ".pth"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
            raise CheckpointError(f"{path}: this .ckpt needs a full unpickle, which can run code and which latentdiff "
                                  f"never does ({first[:160]}); convert it to .safetensors with a tool you trust"
                                  ) from None
        except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(e)[:160]})") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'state_dict': ...}})")
        return data, {}
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (.safetensors or .ckpt)")


def detect(state: dict, where: str) -> str:
    """"sd1", "sd2" or "inpaint" (and its base) from the keys; CheckpointError for another architecture."""
    if any(k.startswith("conditioner.embedders.") for k in state) or f"{UNET_PREFIX}label_emb.0.0.weight" in state:
        raise CheckpointError(f"{where}: an SDXL checkpoint (conditioner.embedders / label_emb) was detected; "
                              "latentdiff loads Stable Diffusion 1.x / 2.x single files only")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in state:
        found = sorted({k.split(".")[0] for k in state})[:8]
        raise CheckpointError(f"{where}: no Stable Diffusion U-Net (model.diffusion_model.*) in this file; its "
                              f"top-level keys are {found}")
    if any(k.startswith("control_model.") for k in state):
        raise CheckpointError(f"{where}: a ControlNet checkpoint was detected; not supported")
    return "sd2" if any(k.startswith(OPENCLIP_PREFIX) for k in state) else "sd1"


def infer_unet_config(state: dict, where: str) -> UNetConfig:
    """The UNetConfig of CompVis U-Net weights (``state`` without prefix), read from the tensor shapes."""
    conv_in = state["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    out_ch = state["out.2.weight"].shape[0]
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    widths, attn, levels = [], [], []  # per res block of the down path: its width and whether attention follows
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            levels.append((widths, attn))
            widths, attn = [], []
            continue
        widths.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        attn.append(f"input_blocks.{i}.1.proj_in.weight" in state)
    levels.append((widths, attn))
    nrb = len(levels[0][0])
    if any(len(w) != nrb for w, _ in levels):
        raise CheckpointError(f"{where}: unequal residual blocks per level; not a Stable Diffusion U-Net")
    ctx_key = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    if ctx_key is None:
        raise CheckpointError(f"{where}: the U-Net has no cross-attention; not a Stable Diffusion U-Net")
    context = state[ctx_key].shape[1]
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("middle_block.1.transformer_blocks."))
    linear = state["middle_block.1.proj_in.weight"].ndim == 2
    heads = {768: dict(num_heads=8, head_channels=-1), 1024: dict(num_heads=-1, head_channels=64)}.get(context)
    if heads is None:
        raise CheckpointError(f"{where}: cross-attention width {context} is neither SD 1.x's 768 nor SD 2.x's 1024, "
                              "so the attention heads are unknown; convert a diffusers folder instead")
    return UNetConfig(
        in_channels=out_ch, out_channels=out_ch, concat_channels=conv_in.shape[1] - out_ch, model_channels=mc,
        channel_mult=tuple(w[0] // mc for w, _ in levels), num_res_blocks=nrb,
        attention_resolutions=tuple(2**i for i, (_, a) in enumerate(levels) if any(a)), context_dim=context,
        transformer_depth=depth, use_linear_proj=linear, num_groups=32, **heads,
    )  # fmt: skip


def infer_vae_config(state: dict) -> AutoencoderConfig:
    """The AutoencoderConfig of CompVis first-stage weights (without prefix), from the tensor shapes."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels)]
    nrb = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    z = state["decoder.conv_in.weight"].shape[1]
    return AutoencoderConfig(in_channels=state["encoder.conv_in.weight"].shape[1],
                             out_channels=state["decoder.conv_out.weight"].shape[0], resolution=2 ** (levels - 1) * 64,
                             ch=ch, ch_mult=tuple(mult), num_res_blocks=nrb, z_channels=z,
                             embed_dim=state["quant_conv.weight"].shape[0] // 2, norm_groups=32)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _unet_state(state: dict, cfg: UNetConfig, where: str, ema: bool) -> dict:
    """Our U-Net state dict from CompVis keys; EMA weights (model_ema.<name without dots>) when present and ``ema``."""
    names = unet_key_map(cfg, "compvis")
    out = {}
    use_ema = ema and any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state)
    for ours, theirs in names.items():
        key = UNET_PREFIX + theirs
        if use_ema:
            key = EMA_PREFIX + ("diffusion_model." + theirs).replace(".", "")
        if key not in state:
            raise CheckpointError(f"{where}: missing U-Net weight {key}")
        out[ours] = state[key]
    return out


def load_single_file(path, *, tokenizer=None, prediction: str | None = None, ema: bool = True) -> Pipeline:
    """A Pipeline from an SD 1.x / 2.x single file (see the module docstring for what is inferred)."""
    path = Path(path)
    state, meta = read_single_file(path)
    where = str(path)
    info = json.loads(meta[META_KEY]) if META_KEY in meta else None
    layout = detect(state, where)
    tok = _tokenizer(path, info, meta, tokenizer)
    used = set(HARMLESS) | set(IGNORED)
    ucfg = UNetConfig.from_dict(info["unet"]) if info else infer_unet_config(_strip(state, UNET_PREFIX), where)
    unet_state = _unet_state(state, ucfg, where, ema)
    names = unet_key_map(ucfg, "compvis")
    used |= {UNET_PREFIX + v for v in names.values()} | {k for k in state if k.startswith(EMA_PREFIX)}
    shapes = meta_model(UNet, ucfg).state_dict()
    unet = build_unet(ucfg, {k: v.reshape(shapes[k].shape) for k, v in unet_state.items()}, where)
    vstate = _strip(state, VAE_PREFIX)
    vcfg = AutoencoderConfig.from_dict(info["vae"]) if info else infer_vae_config(vstate)
    used |= {VAE_PREFIX + k for k in vstate} | {k for k in state if k.startswith("first_stage_model.loss.")}
    vstate = {k: v for k, v in vstate.items() if not k.startswith("loss.")}
    autoencoder = build_autoencoder(vcfg, vstate, info["latent_scale"] if info else 0.18215, where)
    if layout == "sd2":
        text_state = openclip_to_transformers(_strip(state, OPENCLIP_PREFIX))
        used |= {k for k in state if k.startswith(OPENCLIP_PREFIX)}
    else:
        text_state = _strip(state, HF_PREFIX)
        used |= {k for k in state if k.startswith(HF_PREFIX)}
    unexpected = sorted(set(state) - used)
    if unexpected:  # reported by name, not fatal: published files carry odd extras (training state, other heads)
        warnings.warn(f"{where}: ignored {len(unexpected)} unexpected key(s): {unexpected[:6]}"
                      f"{' ...' if len(unexpected) > 6 else ''}", stacklevel=2)
    from transformers import CLIPTextConfig

    tconfig = (CLIPTextConfig(**info["text_encoder"]) if info
               else text_config_from_state(text_state, "gelu" if layout == "sd2" else "quick_gelu"))
    text_model = text_model_from_state(text_state, tconfig, where)
    conditioner = ClipConditioner(text_model, tok, info.get("layer", "last") if info else "last")
    if info:
        diffusion, sample = info["diffusion"], info["sample"]
    else:
        sched = dict(SD_SCHEDULER, prediction_type={"v": "v_prediction", "eps": "epsilon", "x0": "sample"}.get(
            prediction or ("v" if layout == "sd2" else "eps")))
        diffusion, sample = diffusion_options(sched, where), sampler_options(sched, where)
    size = int(info["size"]) if info else 8 * (64 if layout == "sd1" else 96)
    return assemble(unet, autoencoder, conditioner, diffusion, sample, size, where)


def _tokenizer(path: Path, info, meta: dict, tokenizer):
    """The CLIP tokenizer: ``tokenizer`` (a folder), the files embedded by latentdiff's exporter, or ``tokenizer/``
    beside the checkpoint."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if info and "latentdiff.tokenizer" in meta:
        files = json.loads(meta["latentdiff.tokenizer"])
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            return load_tokenizer(tmp)
    beside = path.parent / "tokenizer"
    if beside.is_dir():
        return load_tokenizer(beside)
    raise MissingFileError(f"{path}: a single file holds no tokenizer; pass tokenizer=FOLDER (vocab.json and "
                           "merges.txt, e.g. the tokenizer/ folder of a diffusers copy) or put a tokenizer/ folder "
                           "beside the file")


def save_single_file(pipe: Pipeline, out) -> Path:
    """Write ``pipe`` as one .safetensors in the CompVis layout (the text encoder in transformers' CLIP names),
    with latentdiff's configs and the tokenizer files in its metadata; written atomically."""
    from safetensors.torch import save_file

    if pipe.autoencoder is None or not isinstance(pipe.conditioner, ClipConditioner):
        raise CheckpointError("--format sd needs a latent model with a CLIP text encoder (a Stable Diffusion model)")
    import dataclasses

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: a single file is written as .safetensors")
    names = unet_key_map(pipe.unet.config, "compvis")
    tensors = {UNET_PREFIX + names[k]: v for k, v in pipe.unet.state_dict().items()}
    tensors.update({VAE_PREFIX + k: v for k, v in pipe.autoencoder.state_dict().items()})
    text = pipe.conditioner.text_model
    tensors.update({HF_PREFIX + k: v for k, v in pipe.conditioner.file_state().items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    files = {k: v for k, v in pipe.conditioner.tokenizer.files.items() if k != "tokenizer.json"}  # derived, large
    info = {"unet": pipe.unet.config.to_dict(), "vae": pipe.autoencoder.config.to_dict(),
            "latent_scale": pipe.latent_scale, "text_encoder": _text_config(text.config),
            "layer": pipe.conditioner.layer, "diffusion": dataclasses.asdict(pipe.config.diffusion),
            "sample": _sample_fields(pipe), "size": pipe.config.data.size}
    meta = {"format": "pt", META_KEY: json.dumps(info), "latentdiff.tokenizer": json.dumps(files)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return out


def _text_config(config) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
            "eos_token_id", "pad_token_id")
    return {k: getattr(config, k) for k in keys}


def _sample_fields(pipe: Pipeline) -> dict:
    s = pipe.config.sample
    keys = ("sampler", "steps", "guidance", "spacing", "offset", "karras", "karras_range", "extra_point",
            "init_noise", "round_model_t", "set_alpha_to_one", "clip_x0", "eta")
    return {k: getattr(s, k) for k in keys}


def scheduler_config_of(pipe: Pipeline) -> dict:
    """The diffusers scheduler config that a single file's pipeline samples with."""
    import dataclasses

    return to_scheduler_config(dataclasses.asdict(pipe.config.diffusion), _sample_fields(pipe))
