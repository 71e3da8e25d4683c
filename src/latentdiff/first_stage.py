"""The first stage as a product: build it from a config, find it again, export it, reconstruct with it.

    latentdiff train configs/shapes_vae_kl_f4.yaml --out runs/kl_f4     # checkpoints + runs/kl_f4/autoencoder/
    latentdiff reconstruct runs/kl_f4 --num 16 --out recon.png          # originals beside reconstructions
    latentdiff eval runs/kl_f4 --num 1000                               # PSNR, SSIM, rFID

A run folder of an autoencoder holds ``config.yaml`` (an :class:`~latentdiff.config.AutoencoderRunConfig`
with the data's channels and size filled in), ``checkpoints/`` and, once training ends, ``autoencoder/``:
the model folder (``config.json`` with the latent scale, ``model.safetensors``) that latent diffusion loads.
latentdiff.folders tells these folders apart; the training objective is train/autoencoder_objective.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import AutoencoderRunConfig, DataSection, check_autoencoder_sections, from_dict, load_config, to_dict
from .data import DATASETS, make_dataset
from .data.folder import folder_dataset
from .errors import CheckpointError, ConfigError, DataError, MissingFileError, RequestError
from .folders import (
    AE_CONFIG_FILE,
    AE_FORMAT,
    AUTOENCODER,
    AUTOENCODER_RUN,
    CONFIG_FILE,
    EXPORT_DIR,
    checkpoint_weights,
    folder_kind,
    load_model_weights,
)
from .nn.autoencoder import Autoencoder, AutoencoderConfig, compute_latent_scale, load_autoencoder, save_autoencoder


def autoencoder_config(config: AutoencoderRunConfig) -> AutoencoderConfig:
    """The network's config from the run config; channels and resolution come from the (resolved) data section."""
    data = config.data
    if data.channels is None or data.size is None:
        raise ValueError("the data section must be resolved (channels and size known) before the autoencoder is built")
    fields = dict(config.autoencoder)
    ch_mult = list(fields.get("ch_mult", AutoencoderConfig.ch_mult))
    f = 2 ** (len(ch_mult) - 1)
    if data.size % f:
        raise ConfigError(f"autoencoder.ch_mult {ch_mult} gives downsampling factor f={f}, which does not "
                          f"divide the image size data.size={data.size}; use fewer levels or another size")
    try:
        return AutoencoderConfig(**fields, in_channels=data.channels, out_channels=data.channels, resolution=data.size)
    except ValueError as e:
        raise ConfigError(f"autoencoder: {e}") from None


def first_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of a dataset, stacked: the batch LDM's scale_by_std looks at."""
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def export(autoencoder: Autoencoder, folder, images: torch.Tensor, seed: int = 0, data=None) -> float:
    """Compute the latent scale on ``images`` (posterior samples drawn with ``seed``) and write the model folder,
    with ``data`` (the run's data section) recorded so that reconstruct and eval find held-out images."""
    generator = torch.Generator().manual_seed(seed)
    device = next(autoencoder.parameters()).device
    scale = compute_latent_scale(autoencoder, images.to(device), generator if device.type == "cpu" else None)
    save_autoencoder(autoencoder, str(folder), latent_scale=scale, data=None if data is None else to_dict(data))
    return scale


def recorded_data(autoencoder: Autoencoder, source: str):
    """The DataSection recorded in a model folder (``training_data``), validated; None when there is none."""
    if getattr(autoencoder, "training_data", None) is None:
        return None
    return from_dict(DataSection, autoencoder.training_data, where=f"{source}/{AE_CONFIG_FILE}", prefix="data.")


def load_run_config(run) -> AutoencoderRunConfig:
    config = load_config(Path(run) / CONFIG_FILE, cls=AutoencoderRunConfig)
    return check_autoencoder_sections(config, where=str(Path(run) / CONFIG_FILE))


def checkpoint_autoencoder(run, config: AutoencoderRunConfig | None = None) -> tuple[Autoencoder, Path]:
    """The autoencoder of an autoencoder run with the trained weights of its newest complete checkpoint, and
    that weights file."""
    config = config if config is not None else load_run_config(run)
    ae = Autoencoder(autoencoder_config(config))
    weights = checkpoint_weights(run, "autoencoder", ema=False)
    load_model_weights(ae, weights)
    return ae, weights


def export_run(run, model_dir) -> float:
    """Write the model folder of an autoencoder run from its newest complete checkpoint, with the latent scale of
    the first training batch (as the run itself does when training ends); returns that scale."""
    config = load_run_config(run)
    ae, _ = checkpoint_autoencoder(run, config)
    images = first_images(make_dataset(config.data), config.train.batch_size)
    return export(ae.eval(), model_dir, images, seed=config.train.seed, data=config.data)


def load_first_stage(path, *, device=None) -> tuple[Autoencoder, AutoencoderRunConfig | None, str]:
    """(autoencoder in eval mode, run config or None, where the weights came from) for a model folder or a
    run folder (its ``autoencoder/`` export when training finished, else its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    kind = folder_kind(path)
    if kind == AUTOENCODER:
        ae, config, source = load_autoencoder(str(path)), None, str(path)
    elif kind == AUTOENCODER_RUN:
        config = load_run_config(path)
        if folder_kind(path / EXPORT_DIR) == AUTOENCODER:
            ae, source = load_autoencoder(str(path / EXPORT_DIR)), str(path / EXPORT_DIR)
        else:
            ae, weights = checkpoint_autoencoder(path, config)
            source = str(weights)
    else:
        raise CheckpointError(f"{path} is not an autoencoder: neither a model folder ({AE_CONFIG_FILE} of format "
                              f"{AE_FORMAT!r}) nor a run folder whose {CONFIG_FILE} has an autoencoder section")
    if device is not None:
        ae = ae.to(device)
    return ae.eval().requires_grad_(False), config, source


@torch.no_grad()
def reconstruct(autoencoder: Autoencoder, images: torch.Tensor, *, batch_size: int = 64, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """x̂ = D(E(x)) in [-1, 1] for a stack of images (KL: the posterior mean, or a sample with ``sample``)."""
    if images.ndim != 4 or images.shape[1] != autoencoder.config.in_channels:
        raise ValueError(f"expected images (N, {autoencoder.config.in_channels}, H, W), got {tuple(images.shape)}")
    device = next(autoencoder.parameters()).device
    out = []
    for xb in images.split(batch_size):
        z = autoencoder.encode(xb.to(device), sample=sample, generator=generator)
        out.append(autoencoder.decode(z).clamp(-1, 1).cpu())
    return torch.cat(out)


def pairs_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave originals and reconstructions (o0, r0, o1, r1, ...) for a grid with pairs side by side."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)


def held_out_data(ae, config, data: str | None, split: str):
    """(dataset, description, has_splits) of the images to reconstruct: ``data`` (a dataset name or an image
    folder, which has no splits) at the autoencoder's resolution and channels, else the run's own data section
    (or the one a model folder records). Errors name the command's --data option."""
    size, channels = ae.config.resolution, ae.config.in_channels
    recorded = config.data if config is not None else recorded_data(ae, "the model folder")
    if data is None:
        if recorded is None:
            raise RequestError("give --data (a dataset name or an image folder): this model folder does not record its "
                               "training data")
        section = dataclasses.replace(recorded, split=split, flip=False, crop="center")
        return make_dataset(section), f"{section.name} ({split})", True
    if data in DATASETS and not Path(data).exists():
        if recorded is not None and recorded.name == data:
            section = dataclasses.replace(recorded, split=split, flip=False, crop="center")
        else:
            section = DataSection(name=data, size=size, channels=channels, split=split)
        return make_dataset(section), f"{data} ({split})", True
    path = Path(data)
    if not path.is_dir():
        raise RequestError(f"--data {data}: not a dataset name ({', '.join(sorted(DATASETS))}) nor an image folder")
    return folder_dataset(path, size=size, channels=channels), str(path), False


def check_images(ae, images) -> None:
    """Images (N, C, H, W) that the autoencoder takes: its channels, sides divisible by f."""
    c, h, w = images.shape[1:]
    if c != ae.config.in_channels:
        raise DataError(f"the images have {c} channels; the autoencoder takes {ae.config.in_channels}")
    if h % ae.f or w % ae.f:
        raise DataError(f"the images are {h}x{w}; the autoencoder's downsampling factor f={ae.f} does not divide that")
