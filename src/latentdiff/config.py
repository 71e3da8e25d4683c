"""Typed run configs: YAML files in ``configs/`` read into dataclasses, validated, overridable as ``key=value``.

One file holds the sections of a run::

    model:      {preset: digits, num_classes: 10, ...}   # the network: preset name + field overrides (open dict,
                                                          # validated by the network's own config dataclass)
    diffusion:  schedule, num_steps, prediction, variance, loss, ...       (DiffusionSection)
    data:       name, root, size, channels, crop, flip, ...                (DataSection)
    train:      steps, batch_size, lr, ema_decay, cond_drop_prob, ...      (TrainSection)
    sample:     sampler, steps, guidance, eta, num, ...                    (SampleSection)
    latent:     first_stage (an autoencoder folder), scale, ...            (LatentSection; absent = pixel space)

The machinery is generic: :func:`from_dict` builds any dataclass from a plain mapping, checking every value
against the field's annotation (int, float, bool, str, Literal, Optional/unions, list, tuple, dict, nested
dataclasses, Any) and its range, and names the file and dotted key in every error::

    configs/x.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)
    configs/x.yaml: train.steps must be an int, got 'ten'

:func:`apply_override` sets one dotted key from ``key=value`` text (the value is parsed as YAML), validated the
same way, its errors naming the override. Nothing here executes code from a config: YAML is read with
``yaml.SafeLoader`` (duplicate keys are errors) and class names never appear in files.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .diffusion import LOSSES, PREDICTIONS, VARIANCES
from .errors import ConfigError, ConfigTypeError
from .fileio import atomic_write_text
from .folders import is_autoencoder_config
from .samplers import SAMPLERS
from .schedules import SCHEDULES, SPACINGS
from .strict import strict_from_dict


def bounded(default=dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False, factory=dataclasses.MISSING):
    """A dataclass field whose numeric value (when not None) must lie in [lo, hi]; *_open excludes that end."""
    meta = {"range": (lo, hi, lo_open, hi_open)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ---- sections -------------------------------------------------------------------------------------------


@dataclass
class DiffusionSection:
    schedule: Literal[SCHEDULES] = "linear"                     # β schedule (schedules.make_betas)
    num_steps: int = bounded(1000, lo=1)                        # T, the number of training timesteps
    schedule_options: dict[str, Any] = field(default_factory=dict)  # make_betas options: beta_start, beta_end, rescale, s, max_beta
    zero_terminal_snr: bool = False                             # rescale β so ᾱ_T = 0 (needs prediction v or x0)
    prediction: Literal[PREDICTIONS] = "eps"                    # network target: ε, x_0 or v
    variance: Literal[VARIANCES] = "fixed_small"                # Σ of the reverse step; learned* doubles output channels
    loss: Literal[LOSSES] = "simple"                            # L_simple, hybrid (L_simple + λ L_vlb) or L_vlb
    vlb_weight: float = bounded(1e-3, lo=0.0)                   # λ of the hybrid loss
    min_snr_gamma: float | None = bounded(None, lo=0.0, lo_open=True)  # min-SNR-γ loss weighting; None = off
    timestep_sampler: Literal["uniform", "loss_second_moment"] = "uniform"  # how training draws t


@dataclass
class DataSection:
    name: str = "digits"                                        # dataset: folder, cifar10, digits, shapes (data.DATASETS)
    root: str | None = None                                     # folder of the files (folder, cifar10); None for embedded data
    size: int | None = bounded(None, lo=1)                      # image side; None = the dataset's own (digits 8, cifar10 32)
    channels: Literal[1, 3, 4] | None = None                    # 1, 3 or 4; None = the dataset's own (folder: 3)
    crop: Literal["center", "random"] = "center"                # folder: crop after resizing the shorter side
    flip: bool = False                                          # random horizontal flips (folder, cifar10)
    split: Literal["train", "test", "all"] = "train"            # which part of the dataset
    captions: Literal["auto", "metadata", "txt", "none"] = "auto"  # folder: where captions come from
    labels: Literal["auto", "metadata", "folder", "none"] = "auto"  # folder: where class labels come from
    seed: int = 0                                               # seed of the random crops/flips (and of procedural data)
    options: dict[str, Any] = field(default_factory=dict)       # extra keyword arguments of the dataset (e.g. shapes')


@dataclass
class TrainSection:
    # The fields of train.TrainConfig, same names and meanings (so the loop's config is a subset of this) ...
    steps: int = bounded(10_000, lo=1)                          # optimizer steps in the whole run
    batch_size: int = bounded(64, lo=1)                         # global batch per optimizer step
    lr: float = bounded(2e-4, lo=0.0, lo_open=True)             # peak AdamW learning rate
    warmup_steps: int = bounded(0, lo=0)                        # linear warm-up steps; 0 = none
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # decay after warm-up
    weight_decay: float = bounded(0.0, lo=0.0)                  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)                   # AdamW (β1, β2)
    adam_eps: float = bounded(1e-8, lo=0.0, lo_open=True)       # AdamW ε
    grad_clip: float = bounded(1.0, lo=0.0)                     # global grad-norm clip; 0 = none
    grad_accum: int = bounded(1, lo=1)                          # micro-batches per optimizer step
    ema_decay: float = bounded(0.9999, lo=0.0, hi=1.0, hi_open=True)  # EMA decay of the weights; 0 = no EMA
    ema_warmup: bool = True                                     # decay_n = min(ema_decay, (1+n)/(10+n))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA when supported, else no
    seed: int = 0                                               # data order, RNGs and sample noise
    deterministic: bool = False                                 # torch.use_deterministic_algorithms
    checkpoint_every: int = bounded(1000, lo=0)                 # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = bounded(3, lo=0)                    # newest checkpoints kept; 0 = all
    sample_every: int = bounded(0, lo=0)                        # steps between sample grids; 0 = never
    sample_num: int = bounded(16, lo=1)                         # images per sample grid
    log_every: int = bounded(10, lo=1)                          # steps averaged per log line
    num_workers: int = bounded(0, lo=0)                         # DataLoader worker processes
    find_unused_parameters: bool = False                        # DDP option for models with unused parameters
    max_minutes: float = bounded(0.0, lo=0.0)                   # stop (with a checkpoint) before a step would end past this; 0 = none
    # ... plus what the run around the loop needs.
    cond_drop_prob: float = bounded(0.0, lo=0.0, hi=1.0)        # drop conditioning (null class / empty prompt) for CFG
    out_dir: str = "runs/default"                               # checkpoints, samples, logs and the resolved config
    resume: str | None = None                                   # "latest", a checkpoint path, or None = start fresh


@dataclass
class SampleSection:
    sampler: str = "ddim"                                       # a name of samplers.SAMPLERS
    steps: int = bounded(50, lo=1)                              # network evaluations grid size
    guidance: float = bounded(1.0, lo=0.0)                      # CFG scale s: ε_u + s(ε_c − ε_u); 1 = no guidance
    guidance_rescale: float = bounded(0.0, lo=0.0, hi=1.0)      # rescale of guided output (Lin et al. 2024); 0 = off
    eta: float = bounded(0.0, lo=0.0)                           # DDIM η: 0 deterministic, 1 DDPM-like
    spacing: Literal[SPACINGS] = "leading"                      # timestep grid
    offset: int = bounded(0, lo=0)                              # added to leading timesteps (Stable Diffusion: 1)
    karras: bool = False                                        # Karras σ grid (sigma-space samplers)
    clip_x0: bool = False                                       # clamp predicted x_0 to [-1, 1] (pixel space)
    num: int = bounded(16, lo=1)                                # images to draw
    batch_size: int = bounded(16, lo=1)                         # images per forward pass
    seed: int = 0                                               # sample i uses seed + i
    labels: list[int] | None = None                             # class ids to draw, cycled; None = all classes in turn
    prompt: str | None = None                                   # caption for text-conditioned models

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(sorted(SAMPLERS))}")


@dataclass
class LatentSection:
    first_stage: str | None = None                              # autoencoder model or run folder; null = pixel-space diffusion.
                                                                # Relative: to the working directory, or (in a saved run or
                                                                # model folder) to that folder
    scale: float | None = bounded(None, lo=0.0, lo_open=True)   # latent scale factor; null = the one saved with the autoencoder
    sample_posterior: bool = True                               # KL first stages: train on posterior samples (LDM) or means


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=dict)         # {"preset": name, field: value, ...} for the network
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    latent: LatentSection = field(default_factory=LatentSection)  # latent diffusion: the first stage to diffuse in


@dataclass
class AutoencoderRunConfig:
    """A run that trains a first stage (``latentdiff train configs/shapes_vae_kl_f4.yaml``). The open sections are
    checked against their classes by :func:`check_autoencoder_sections` (``load_config`` does it)."""
    autoencoder: dict[str, Any] = field(default_factory=dict)   # nn.autoencoder.AutoencoderConfig fields; in/out channels and
                                                                # resolution come from the data
    loss: dict[str, Any] = field(default_factory=dict)          # AutoencoderLossConfig fields
    discriminator: dict[str, Any] | None = None                 # nn.discriminator.DiscriminatorConfig fields; null = no GAN term
    lpips: str | None = None                                    # LPIPS weights file (nn/lpips.py); null = perceptual term off
    data: DataSection = field(default_factory=lambda: DataSection(name="shapes"))
    train: TrainSection = field(default_factory=lambda: TrainSection(ema_decay=0.0))
    eval_num: int = bounded(512, lo=1)                          # held-out images scored (PSNR, SSIM) at the end of training


# The loss weights of the first stage (train/autoencoder_objective.py has the loss itself).
REC_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")


@dataclass
class AutoencoderLossConfig:
    rec_loss: str = "l1"              # pixel reconstruction loss: "l1" or "l2"
    perceptual_weight: float = 1.0    # w_p of LPIPS; ignored (off) when no LPIPS net is given
    kl_weight: float = 1e-6           # KL models: weight of the KL (per image, LDM's scale; see module docstring)
    codebook_weight: float = 1.0      # VQ models: weight of L_codebook + β·L_commit
    disc_weight: float = 0.5          # w_d, multiplies the adaptive weight λ
    disc_factor: float = 1.0          # f_d once the adversarial term is on
    disc_start: int = 0               # optimizer step at which the adversarial term and D's training start
    disc_loss: str = "hinge"          # "hinge" or "vanilla" (softplus) GAN loss
    max_adaptive_weight: float = 1e4  # clamp of λ before w_d
    sample_posterior: bool = True     # KL models: decode a posterior sample (True) or the mean
    image_key: str = "image"          # batch key of the images

    def __post_init__(self):
        if self.rec_loss not in REC_LOSSES:
            raise ValueError(f"unknown rec_loss {self.rec_loss!r}; expected one of {', '.join(REC_LOSSES)}")
        if self.disc_loss not in DISC_LOSSES:
            raise ValueError(f"unknown disc_loss {self.disc_loss!r}; expected one of {', '.join(DISC_LOSSES)}")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor", "max_adaptive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"AutoencoderLossConfig.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderLossConfig":
        """Build from a plain dict (YAML/JSON); an unknown key is an error that names it."""
        return strict_from_dict(cls, d)


def check_autoencoder_sections(config: AutoencoderRunConfig, where: str = "config") -> AutoencoderRunConfig:
    """Every key of the open sections known and typed (against the classes that use them); returns ``config``
    with the values converted."""
    from .nn.autoencoder import AutoencoderConfig
    from .nn.discriminator import DiscriminatorConfig

    filled = ("in_channels", "out_channels", "resolution")
    given = [k for k in filled if k in config.autoencoder]
    if given:
        raise ConfigError(f"{where}: autoencoder.{given[0]} comes from the data (data.channels, data.size); remove it")
    ae = validate_fields(AutoencoderConfig, config.autoencoder, where, "autoencoder.")
    loss = validate_fields(AutoencoderLossConfig, config.loss, where, "loss.")
    disc = None
    if config.discriminator is not None:
        if "in_channels" in config.discriminator:
            raise ConfigError(f"{where}: discriminator.in_channels comes from the data (data.channels); remove it")
        disc = validate_fields(DiscriminatorConfig, config.discriminator, where, "discriminator.")
    # The values together (the classes' own checks); the image size is checked once the data is known.
    levels = len(ae.get("ch_mult", AutoencoderConfig.ch_mult))
    for section, cls, values in (("autoencoder", AutoencoderConfig, {**ae, "resolution": 2 ** max(levels - 1, 0)}),
                                 ("loss", AutoencoderLossConfig, loss), ("discriminator", DiscriminatorConfig, disc)):
        try:
            if values is not None:
                cls(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {section}: {e}") from None
    return dataclasses.replace(config, autoencoder=ae, loss=loss, discriminator=disc)


# ---- validation -----------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or origin in (dict, Mapping):
        return "a mapping"
    if origin in (list, tuple) or tp in (list, tuple):
        return "a list"
    names = {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(where, key, tp, value):
    hint = ""
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, [a for a in typing.get_args(tp) if isinstance(a, str)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigTypeError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}{hint}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def convert(tp, value, where: str, key: str):
    """``value`` checked (and, where lossless, converted) against annotation ``tp``; errors name where/key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            _fail(where, key, tp, value)
        return from_dict(tp, value, where, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            scalar = options[0] in (int, float, bool, str) or typing.get_origin(options[0]) is Literal
            if value is None or (scalar and not _accepts(options[0], value)):
                _fail(where, key, tp, value)  # names the whole type, "an int or null"
            return convert(options[0], value, where, key)  # containers name the inner key that failed
        for a in options:
            try:
                return convert(a, value, where, key)
            except ConfigError:
                continue
        _fail(where, key, tp, value)
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        _fail(where, key, tp, value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e4 written as 1.0e+4
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: YAML 1.1 needs "1.0e-3"
            try:
                return float(value)
            except ValueError:
                _fail(where, key, tp, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, key, tp, value)
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(where, key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigTypeError(f"{where}: {key} must be a list of {len(args)} values, got {list(value)!r}")
            return tuple(convert(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            _fail(where, key, tp, value)
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is str and not isinstance(k, str):
                raise ConfigTypeError(f"{where}: {key} has a non-string key {k!r}")
            out[k] = convert(vt, v, where, f"{key}.{k}")
        return out
    raise TypeError(f"config annotation {tp!r} of {key} is not supported")


def _accepts(tp, value) -> bool:
    try:
        convert(tp, value, "", "")
    except ConfigError:
        return False
    return True


def _check_range(f: dataclasses.Field, value, where: str, key: str):
    rng = f.metadata.get("range")
    if rng is None or value is None or not isinstance(value, (int, float)):
        return value
    lo, hi, lo_open, hi_open = rng
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: {key} must be a number, got nan")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{where}: {key} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(f"{where}: {key} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return value


def _unknown(where: str, prefix: str, key, names) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")


def validate_fields(cls, data: Mapping, where: str = "config", prefix: str = "", ignore=()) -> dict:
    """Check a PARTIAL mapping against dataclass ``cls``: every key known, every value typed. Returns the
    converted dict. For overrides of a preset, e.g. the model section against the network's config class."""
    if not isinstance(data, Mapping):
        raise ConfigTypeError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    out = {}
    for k, v in data.items():
        if k in ignore:
            out[k] = v
            continue
        if k not in fields:
            raise _unknown(where, prefix, k, list(fields))
        out[k] = _check_range(fields[k], convert(hints[k], v, where, f"{prefix}{k}"), where, f"{prefix}{k}")
    return out


def from_dict(cls, data: Mapping | None, where: str = "config", prefix: str = ""):
    """An instance of dataclass ``cls`` from a mapping; missing keys take the field defaults.

    ``where`` (a file name, an override) and ``prefix`` (the dotted path of this section) go into every error.
    """
    values = validate_fields(cls, {} if data is None else data, where, prefix)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix}{f.name}'")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the class's own __post_init__ checks
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def update(obj, data: Mapping, where: str = "config", prefix: str = ""):
    """A copy of dataclass instance ``obj`` with the fields in ``data`` replaced, validated like from_dict."""
    values = validate_fields(type(obj), data, where, prefix)
    try:
        return dataclasses.replace(obj, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or type(obj).__name__}: {e}") from None


def to_dict(obj) -> Any:
    """Plain YAML-ready data (dicts, lists, scalars) from a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---- overrides --------------------------------------------------------------------------------------------


def _set_path(obj, tp, parts: list[str], value, where: str, done: list[str]):
    """A copy of ``obj`` (annotated ``tp``) with the dotted path ``parts`` set to ``value``."""
    name, key = parts[0], ".".join(done + [parts[0]])
    if dataclasses.is_dataclass(obj):
        fields = {f.name: f for f in dataclasses.fields(obj) if f.init}
        if name not in fields:
            raise _unknown(where, "".join(p + "." for p in done), name, list(fields))
        ftp = _hints(type(obj))[name]
        if len(parts) == 1:
            new = _check_range(fields[name], convert(ftp, value, where, key), where, key)
        else:
            new = _set_path(getattr(obj, name), ftp, parts[1:], value, where, done + [name])
        try:
            return dataclasses.replace(obj, **{name: new})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(obj, Mapping):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[dict[...]]: the dict's annotation
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), Any)
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        out = dict(obj)
        if len(parts) == 1:
            out[name] = convert(vt, value, where, key)
        else:
            child = out.get(name, {})
            if not isinstance(child, Mapping):
                raise ConfigError(f"{where}: {key} is {child!r}, not a mapping with key '{parts[1]}'")
            out[name] = _set_path(child, vt if vt is not Any else dict, parts[1:], value, where, done + [name])
        return out
    raise ConfigError(f"{where}: {'.'.join(done)} is {obj!r}, not a section with key '{name}'")


def apply_override(config, text: str):
    """``config`` with one ``dotted.key=value`` override applied; the value is parsed as YAML.

    A value meant as a string that YAML reads otherwise (``data.root=2024``) falls back to the raw text.
    """
    where = f"override {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{where}: expected key=value, e.g. train.lr=1e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"{where}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML ({e})") from None
    try:
        return _set_path(config, type(config), parts, value, where, [])
    except ConfigTypeError as first:
        if isinstance(value, str) or not raw.strip():
            raise
        try:
            return _set_path(config, type(config), parts, raw.strip(), where, [])
        except ConfigError:
            raise first from None


# ---- files ------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            k = self.construct_object(key_node, deep=deep)
            if k in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r} (line {line})", key_node.start_mark)
            seen.add(k)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path) -> dict:
    """The mapping in a YAML file (empty file -> {}); clear errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path, overrides=(), cls=None):
    """The config in YAML file ``path`` with ``key=value`` overrides applied in order, validated.

    ``cls`` None picks the kind from the file: :class:`AutoencoderRunConfig` when it has an ``autoencoder``
    section, else :class:`Config` (a diffusion model)."""
    data = read_yaml(path)
    if cls is None:
        cls = AutoencoderRunConfig if is_autoencoder_config(data) else Config
    config = from_dict(cls, data, where=str(path))
    for text in overrides:
        config = apply_override(config, text)
    if isinstance(config, AutoencoderRunConfig):
        config = check_autoencoder_sections(config, where=str(path) + (" (with overrides)" if overrides else ""))
    return config


def dump_config(config, path) -> None:
    """Write ``config`` (a dataclass) as YAML that :func:`load_config` reads back equal; atomic."""
    text = "# resolved latentdiff config\n" + yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    atomic_write_text(path, text)
