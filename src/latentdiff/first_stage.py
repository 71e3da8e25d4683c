"""The first stage as a product: build it from a config, train it, find it again, reconstruct with it.

    latentdiff train configs/shapes_vae_kl_f4.yaml --out runs/kl_f4     # checkpoints + runs/kl_f4/autoencoder/
    latentdiff reconstruct runs/kl_f4 --num 16 --out recon.png          # originals beside reconstructions
    latentdiff eval runs/kl_f4 --num 1000                               # PSNR, SSIM, rFID

A run folder of an autoencoder holds ``config.yaml`` (an :class:`~latentdiff.config.AutoencoderRunConfig`
with the data's channels and size filled in), ``checkpoints/`` and, once training ends, ``autoencoder/``:
the model folder (``config.json`` with the latent scale, ``model.safetensors``) that latent diffusion loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .config import AutoencoderRunConfig, ConfigError, check_autoencoder_sections
from .nn.autoencoder import CONFIG_FILE as AE_CONFIG_FILE
from .nn.autoencoder import FORMAT, Autoencoder, AutoencoderConfig, compute_latent_scale, load_autoencoder, save_autoencoder

RUN_CONFIG_FILE = "config.yaml"
EXPORT_DIR = "autoencoder"  # the model folder a run writes at its end


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


def build_objective(config: AutoencoderRunConfig):
    """(autoencoder, AutoencoderObjective) of a resolved run config: the discriminator when the config has
    one, LPIPS from its local weights file when given."""
    from .nn.discriminator import DiscriminatorConfig, PatchDiscriminator
    from .nn.lpips import load_lpips
    from .train.autoencoder_objective import AutoencoderLossConfig, AutoencoderObjective

    ae = Autoencoder(autoencoder_config(config))
    disc = None
    if config.discriminator is not None:
        disc = PatchDiscriminator(DiscriminatorConfig(**config.discriminator, in_channels=config.data.channels))
    lpips = None
    if config.lpips is not None:
        if not Path(config.lpips).is_file():
            raise FileNotFoundError(f"lpips: weights file {config.lpips} not found (LPIPS weights are never downloaded; "
                                    "set lpips: null to train without the perceptual term)")
        lpips = load_lpips(config.lpips)
    loss = AutoencoderLossConfig(**config.loss)
    return ae, AutoencoderObjective(ae, discriminator=disc, lpips=lpips, config=loss)


def first_images(dataset, n: int) -> torch.Tensor:
    """The first ``n`` images of a dataset, stacked: the batch LDM's scale_by_std looks at."""
    n = min(n, len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(n)])


def export(autoencoder: Autoencoder, folder, images: torch.Tensor, seed: int = 0, data=None) -> float:
    """Compute the latent scale on ``images`` (posterior samples drawn with ``seed``) and write the model folder,
    with ``data`` (the run's data section) recorded so that reconstruct and eval find held-out images."""
    from .config import to_dict

    generator = torch.Generator().manual_seed(seed)
    device = next(autoencoder.parameters()).device
    scale = compute_latent_scale(autoencoder, images.to(device), generator if device.type == "cpu" else None)
    save_autoencoder(autoencoder, str(folder), latent_scale=scale, data=None if data is None else to_dict(data))
    return scale


def recorded_data(autoencoder: Autoencoder, source: str):
    """The DataSection recorded in a model folder (``training_data``), validated; None when there is none."""
    from .config import DataSection, from_dict

    if getattr(autoencoder, "training_data", None) is None:
        return None
    return from_dict(DataSection, autoencoder.training_data, where=f"{source}/{AE_CONFIG_FILE}", prefix="data.")


def is_autoencoder_folder(path) -> bool:
    """A model folder written by :func:`~latentdiff.nn.autoencoder.save_autoencoder`."""
    f = Path(path) / AE_CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def is_autoencoder_run(path) -> bool:
    """A run folder whose config.yaml has an ``autoencoder`` section."""
    from .config import is_autoencoder_config, read_yaml

    f = Path(path) / RUN_CONFIG_FILE
    if not f.is_file():
        return False
    try:
        return is_autoencoder_config(read_yaml(f))
    except (ValueError, OSError):
        return False


def is_autoencoder(path) -> bool:
    return is_autoencoder_folder(path) or is_autoencoder_run(path)


def load_run_config(run) -> AutoencoderRunConfig:
    from .config import load_config

    config = load_config(Path(run) / RUN_CONFIG_FILE, cls=AutoencoderRunConfig)
    return check_autoencoder_sections(config, where=str(Path(run) / RUN_CONFIG_FILE))


def load_first_stage(path, *, device=None) -> tuple[Autoencoder, AutoencoderRunConfig | None, str]:
    """(autoencoder in eval mode, run config or None, where the weights came from) for a model folder or a
    run folder (its ``autoencoder/`` export when training finished, else its newest complete checkpoint)."""
    from .pipeline import checkpoint_weights
    from .train.checkpoint import load_model_weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_autoencoder_folder(path):
        ae, config, source = load_autoencoder(str(path)), None, str(path)
    elif is_autoencoder_run(path):
        config = load_run_config(path)
        if is_autoencoder_folder(path / EXPORT_DIR):
            ae, source = load_autoencoder(str(path / EXPORT_DIR)), str(path / EXPORT_DIR)
        else:
            ae = Autoencoder(autoencoder_config(config))
            weights = checkpoint_weights(path, "autoencoder", ema=False)
            load_model_weights(ae, weights)
            source = str(weights)
    else:
        raise ValueError(f"{path} is not an autoencoder: neither a model folder ({AE_CONFIG_FILE} of format {FORMAT!r}) "
                         f"nor a run folder whose {RUN_CONFIG_FILE} has an autoencoder section")
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
    from .config import DataSection
    from .data import DATASETS, make_dataset
    from .data.folder import folder_dataset

    size, channels = ae.config.resolution, ae.config.in_channels
    recorded = config.data if config is not None else recorded_data(ae, "the model folder")
    if data is None:
        if recorded is None:
            raise ValueError("give --data (a dataset name or an image folder): this model folder does not record its training data")
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
        raise ValueError(f"--data {data}: not a dataset name ({', '.join(sorted(DATASETS))}) nor an image folder")
    return folder_dataset(path, size=size, channels=channels), str(path), False


def check_images(ae, images) -> None:
    """Images (N, C, H, W) that the autoencoder takes: its channels, sides divisible by f."""
    c, h, w = images.shape[1:]
    if c != ae.config.in_channels:
        raise ValueError(f"the images have {c} channels; the autoencoder takes {ae.config.in_channels}")
    if h % ae.f or w % ae.f:
        raise ValueError(f"the images are {h}x{w}; the autoencoder's downsampling factor f={ae.f} does not divide that")
