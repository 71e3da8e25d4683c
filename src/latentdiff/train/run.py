"""Train a diffusion model from a resolved config: the glue between configs, data, pipeline and the loop.

``latentdiff train CONFIG`` calls :func:`train_from_config`. The run folder gets the resolved config
(``config.yaml``, with the data's channels and size filled in) before the first step, so that a run killed at
any point can be resumed and sampled from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config, ConfigError, dump_config, load_config
from ..data import make_dataset
from ..pipeline import CONFIG_FILE, Pipeline
from .config import TrainConfig
from .loop import TrainResult, train
from .objective import DiffusionObjective


def resolve_data(config: Config):
    """Build the dataset and fill in ``data.channels`` and ``data.size`` from its first item."""
    dataset = make_dataset(config.data)
    if len(dataset) == 0:
        raise ValueError(f"dataset {config.data.name!r} is empty")
    image = dataset[0]["image"]
    if image.ndim != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"dataset {config.data.name!r} gives images of shape {tuple(image.shape)}; expected square (C, H, W)")
    data = dataclasses.replace(config.data, channels=int(image.shape[0]), size=int(image.shape[1]))
    return dataset, dataclasses.replace(config, data=data)


def train_config(section) -> TrainConfig:
    """The loop's TrainConfig from the config's train section (shared field names)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in dataclasses.asdict(section).items() if k in names})


def train_from_config(config: Config, out_dir=None, *, resume: bool = False, progress: bool = True, callback=None) -> TrainResult:
    """Train the config's model in ``out_dir`` (default: ``config.train.out_dir``); ``resume`` continues from
    the newest complete checkpoint there, with the config that run was started with."""
    out_dir = Path(out_dir or config.train.out_dir)
    saved = out_dir / CONFIG_FILE
    if resume and saved.is_file():
        previous = load_config(saved)
        if previous.model != config.model or previous.diffusion != config.diffusion:
            raise ConfigError(f"{saved}: the run was started with another model or diffusion config; resume with that config or use a new --out")
    dataset, config = resolve_data(config)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out_dir)))
    pipe = Pipeline.from_config(config)
    num_classes = pipe.num_classes
    if num_classes is not None and "label" not in dataset[0]:
        raise ValueError(f"model.num_classes is {num_classes} but dataset {config.data.name!r} has no labels")
    objective = DiffusionObjective(
        pipe.unet.train(), pipe.diffusion,
        cond_key="label" if num_classes is not None else None, num_classes=num_classes,
        cond_drop_prob=config.train.cond_drop_prob,
        sample_sampler=config.sample.sampler, sample_steps=config.sample.steps,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, saved)
    return train(objective, dataset, train_config(config.train), out_dir, resume=resume, progress=progress, callback=callback)
