"""Imported weights and configs -> a latentdiff :class:`~latentdiff.pipeline.Pipeline`, and back to parts.

The networks are built on the meta device and take the loaded tensors in place (``assign``), so a Stable
Diffusion-sized model never exists twice in memory. Missing and unexpected keys are reported by name.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ConditioningSection, Config, DataSection, DiffusionSection, LatentSection, SampleSection, update
from ..diffusion import GaussianDiffusion
from ..errors import CheckpointError
from ..nn.autoencoder import Autoencoder, AutoencoderConfig
from ..nn.unet import UNet, UNetConfig
from ..pipeline import Pipeline, build_diffusion
from .meta import meta_model

# Stable Diffusion's sampling defaults in diffusers' pipelines.
SD_SAMPLE = {"steps": 50, "guidance": 7.5, "num": 4, "batch_size": 4}


def _check_keys(expected: dict, state: dict, where: str, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        more = lambda ks: f"{ks[:6]}{f' (+{len(ks) - 6} more)' if len(ks) > 6 else ''}"  # noqa: E731
        raise CheckpointError(f"{where}: {what} weights do not fit the detected architecture: missing "
                              f"{more(missing)}, unexpected {more(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{where}: {what} tensor shapes differ: {wrong[:4]}")


def materialize(cls, config, state: dict, where: str, what: str):
    """``cls(config)`` built on the meta device with ``state`` (float32, CPU) assigned to it."""
    expected = meta_model(cls, config).state_dict()
    with torch.device("meta"):
        model = cls(config)
    _check_keys(expected, state, where, what)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def build_unet(config: UNetConfig, state: dict, where: str) -> UNet:
    return materialize(UNet, config, state, where, "U-Net")


def build_autoencoder(config: AutoencoderConfig, state: dict, scale: float, where: str) -> Autoencoder:
    ae = materialize(Autoencoder, config, state, where, "autoencoder")
    ae.latent_scale = float(scale)
    return ae


def assemble(unet: UNet, autoencoder: Autoencoder, conditioner, diffusion: dict, sample: dict, size: int,
             where: str) -> Pipeline:
    """The Pipeline of imported networks, a ``diffusion`` section (dict), ``sample`` fields (dict) and the image
    side ``size`` it was trained at."""
    section = update(DiffusionSection(), diffusion, where=where, prefix="diffusion.")
    process: GaussianDiffusion = build_diffusion(section)
    config = Config(
        model=unet.config.to_dict(), diffusion=section,
        data=DataSection(name="folder", size=size, channels=autoencoder.config.in_channels),
        sample=update(SampleSection(), {**SD_SAMPLE, **sample}, where=where, prefix="sample."),
        latent=LatentSection(first_stage="first_stage", scale=autoencoder.latent_scale, cache=False),
        conditioning=ConditioningSection(kind="clip"),
    )  # fmt: skip
    return Pipeline(unet, process, config, autoencoder, conditioner)


def sample_fields(config: Config) -> dict:
    """The sample section of a pipeline's config as a dict (for writing a scheduler config)."""
    return dataclasses.asdict(config.sample)
