"""diffusers model folders in and out: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (the StableDiffusionPipeline, Img2Img and Inpaint layouts; they share one folder layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import CheckpointError, MissingFileError
from ..fileio import atomic_write, atomic_write_text, read_json
from ..nn.autoencoder import Autoencoder
from ..nn.unet import UNet
from ..pipeline import Pipeline
from .assemble import assemble, build_autoencoder, build_unet, sample_fields
from .clip import load_conditioner
from .meta import meta_model
from .schedulers import from_scheduler_config, to_scheduler_config
from .unet_keys import unet_config_from_diffusers, unet_config_to_diffusers, unet_key_map
from .vae_keys import is_attention_matrix, vae_config_from_diffusers, vae_config_to_diffusers, vae_key_to_diffusers

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def read_part_config(path: Path) -> dict:
    """A JSON config of the folder (model_index.json, a part's config.json): a missing file or one that is not a
    JSON object is an error naming it."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    return read_json(path, CheckpointError)


def read_safetensors(path: Path) -> dict:
    """All tensors of a .safetensors file; a truncated or corrupt file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt: {e})") from None


def part_weights(folder: Path) -> dict:
    """The weights of one part folder (unet/, vae/): its safetensors file (a .bin pickle is refused)."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_safetensors(folder / name)
    if any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: weights only as a pickled .bin file, which latentdiff never unpickles; "
                              "convert them to .safetensors first")
    raise MissingFileError(f"{folder}: no {' or '.join(WEIGHT_NAMES)}")


def load_diffusers(path) -> Pipeline:
    """A Pipeline from a diffusers folder; missing parts and unsupported architectures are one-line errors."""
    path = Path(path)
    for part in PARTS:
        if not (path / part).is_dir():
            raise MissingFileError(f"{path} is a diffusers folder without {part}/ (a Stable Diffusion folder has "
                                   f"{', '.join(p + '/' for p in PARTS)})")
    index = read_part_config(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if "XL" in cls or (path / "text_encoder_2").is_dir():
        raise CheckpointError(f"{path}: an SDXL pipeline ({cls}) was detected; latentdiff loads Stable Diffusion "
                              "1.x / 2.x (and their inpainting variants) only")
    ucfg_raw = read_part_config(path / "unet" / "config.json")
    ucfg = unet_config_from_diffusers(ucfg_raw, str(path / "unet" / "config.json"))
    state = part_weights(path / "unet")
    names = unet_key_map(ucfg, "diffusers")
    missing = sorted(set(names.values()) - set(state))
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        raise CheckpointError(f"{path / 'unet'}: weights do not fit its config.json: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    shapes = meta_model(UNet, ucfg).state_dict()
    unet = build_unet(ucfg, {k: state[v].reshape(shapes[k].shape) for k, v in names.items()}, str(path / "unet"))
    vcfg_raw = read_part_config(path / "vae" / "config.json")
    vcfg = vae_config_from_diffusers(vcfg_raw, str(path / "vae" / "config.json"))
    vstate = part_weights(path / "vae")
    levels = len(vcfg.ch_mult)
    ours = {}
    vshapes = meta_model(Autoencoder, vcfg).state_dict()
    for k, ref in vshapes.items():
        name = vae_key_to_diffusers(k, levels)
        if name not in vstate:
            raise CheckpointError(f"{path / 'vae'}: missing weight {name}")
        ours[k] = vstate[name].reshape(ref.shape)
    unexpected = sorted(set(vstate) - {vae_key_to_diffusers(k, levels) for k in vshapes})
    if unexpected:
        raise CheckpointError(f"{path / 'vae'}: unexpected weights {unexpected[:6]}")
    autoencoder = build_autoencoder(vcfg, ours, vcfg_raw.get("scaling_factor", 0.18215), str(path / "vae"))
    conditioner = load_conditioner(path)
    if conditioner.width != ucfg.context_dim:
        raise CheckpointError(f"{path}: the text encoder's width {conditioner.width} differs from the U-Net's "
                              f"cross_attention_dim {ucfg.context_dim}")
    sched_file = path / "scheduler" / "scheduler_config.json"
    diffusion, sample, _ = from_scheduler_config(read_part_config(sched_file), str(sched_file))
    size = int(ucfg_raw.get("sample_size") or 64) * autoencoder.f
    return assemble(unet, autoencoder, conditioner, diffusion, sample, size, str(path))


def save_diffusers(pipe: Pipeline, out) -> Path:
    """Write ``pipe`` as a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` (or the Inpaint one,
    for a 9-channel U-Net) loads; CheckpointError, with nothing written, for a model diffusers cannot express."""
    from safetensors.torch import save_file

    from .clip import ClipConditioner

    if pipe.autoencoder is None or not isinstance(pipe.conditioner, ClipConditioner):
        raise CheckpointError("--format diffusers needs a latent model with a CLIP text encoder (a Stable Diffusion "
                              "model): latentdiff's own text and class conditioners and pixel-space models have no "
                              "diffusers pipeline equivalent; keep them in the latentdiff format")
    size = pipe.config.data.size // pipe.autoencoder.f
    ucfg = unet_config_to_diffusers(pipe.unet.config, size)
    vcfg = vae_config_to_diffusers(pipe.autoencoder.config, pipe.latent_scale)
    sched = to_scheduler_config(_asdict(pipe.config.diffusion), sample_fields(pipe.config))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = unet_key_map(pipe.unet.config, "diffusers")
    ustate = pipe.unet.state_dict()
    unet = {names[k]: v for k, v in ustate.items()}  # the same shapes in both layouts
    levels = len(pipe.autoencoder.config.ch_mult)
    vae = {vae_key_to_diffusers(k, levels): (v[:, :, 0, 0] if is_attention_matrix(k) else v)
           for k, v in pipe.autoencoder.state_dict().items()}
    for part, cfg, state in (("unet", ucfg, unet), ("vae", vcfg, vae)):
        (out / part).mkdir(exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(out / part / WEIGHT_NAMES[0], lambda tmp, t=tensors: save_file(t, tmp))
        atomic_write_text(out / part / "config.json", json.dumps(cfg, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    atomic_write_text(out / "scheduler" / "scheduler_config.json", json.dumps(sched, indent=2))
    for part in ("text_encoder", "tokenizer"):
        if (out / part).exists():
            shutil.rmtree(out / part)
    pipe.conditioner.save_folders(out)
    inpaint = pipe.unet.config.concat_channels == 5
    index = {"_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
             "_diffusers_version": "0.30.0", "feature_extractor": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", sched["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    atomic_write_text(out / "model_index.json", json.dumps(index, indent=2))
    return out


def _asdict(section) -> dict:
    import dataclasses

    return dataclasses.asdict(section)
