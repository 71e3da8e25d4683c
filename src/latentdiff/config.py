"""Typed run configs: YAML files in ``configs/`` read into dataclasses, validated, overridable as ``key=value``.

One file holds the sections of a run::

    model:      {preset: digits, num_classes: 10, ...}   # the network: preset name + field overrides (open dict,
                                                          # validated by the network's own config dataclass)
    diffusion:  schedule, num_steps, prediction, variance, loss, ...       (DiffusionSection)
    data:       name, root, size, channels, crop, flip, ...                (DataSection)
    train:      steps, batch_size, lr, ema_decay, cond_drop_prob, ...      (TrainConfig)
    sample:     sampler, steps, guidance, eta, num, ...                    (SampleSection)
    latent:     first_stage (an autoencoder folder), scale, ...            (LatentSection; absent = pixel space)

Every section is built by the one strict builder of :mod:`latentdiff.dataclass_io` (re-exported here:
:func:`from_dict`, :func:`update`, :func:`validate_fields`, :class:`ConfigError`, ...), which checks every value
against the field's annotation and range and names the file and dotted key in every error::

    configs/x.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)
    configs/x.yaml: train.steps must be an int, got 'ten'

:func:`apply_override` sets one dotted key from ``key=value`` text (the value is parsed as YAML), validated the
same way, its errors naming the override. Nothing here executes code from a config: YAML is read with
``yaml.SafeLoader`` (duplicate keys are errors) and class names never appear in files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .dataclass_io import (  # noqa: F401  (re-exported: latentdiff.config is where users find them)
    ConfigError,
    ConfigTypeError,
    FromDict,
    bounded,
    check_fields,
    convert,
    from_dict,
    set_path,
    to_dict,
    update,
    validate_fields,
)
from .diffusion import LOSSES, PREDICTIONS, VARIANCES
from .errors import MissingFileError
from .fileio import atomic_write_text
from .folders import is_autoencoder_config
from .schedules import SCHEDULES, SPACINGS

LR_SCHEDULES = ("constant", "linear", "cosine")      # the lr after warm-up (train.config.lr_factor)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")     # auto = bf16 on CUDA when supported, else no


# ---- sections -------------------------------------------------------------------------------------------


@dataclass
class DiffusionSection:
    schedule: Literal[SCHEDULES] = "linear"                     # β schedule (schedules.make_betas)
    num_steps: int = bounded(1000, lo=1)                        # T, the number of training timesteps
    schedule_options: dict[str, Any] = field(default_factory=dict)  # make_betas options: beta_start, beta_end, rescale,
                                                                    # s, max_beta
    zero_terminal_snr: bool = False                             # rescale β so ᾱ_T = 0 (needs prediction v or x0)
    prediction: Literal[PREDICTIONS] = "eps"                    # network target: ε, x_0 or v
    variance: Literal[VARIANCES] = "fixed_small"                # Σ of the reverse step; learned*: 2x output channels
    loss: Literal[LOSSES] = "simple"                            # L_simple, hybrid (L_simple + λ L_vlb) or L_vlb
    vlb_weight: float = bounded(1e-3, lo=0.0)                   # λ of the hybrid loss
    min_snr_gamma: float | None = bounded(None, lo=0.0, lo_open=True)  # min-SNR-γ loss weighting; None = off
    timestep_sampler: Literal["uniform", "loss_second_moment"] = "uniform"  # how training draws t


@dataclass
class DataSection:
    name: str = "digits"                                        # one of data.DATASETS: folder, cifar10, digits, shapes
    root: str | None = None                                     # folder of the files (folder, cifar10); None: embedded
    size: int | None = bounded(None, lo=1)                      # image side; None: the dataset's (digits 8, cifar10 32)
    channels: Literal[1, 3, 4] | None = None                    # 1, 3 or 4; None = the dataset's own (folder: 3)
    crop: Literal["center", "random"] = "center"                # folder: crop after resizing the shorter side
    flip: bool = False                                          # random horizontal flips (folder, cifar10)
    split: Literal["train", "test", "all"] = "train"            # which part of the dataset
    captions: Literal["auto", "metadata", "txt", "none"] = "auto"  # folder: where captions come from
    labels: Literal["auto", "metadata", "folder", "none"] = "auto"  # folder: where class labels come from
    seed: int = 0                                               # seed of random crops/flips (and of procedural data)
    options: dict[str, Any] = field(default_factory=dict)       # extra keyword arguments of the dataset (e.g. shapes')


@dataclass
class TrainConfig(FromDict):
    """Every setting of a training run: the loop's (``latentdiff.train.train`` takes this class or a mapping of
    its fields) and the few the run around it needs. The ``train`` section of a config file; direct
    construction is validated as strictly as a file (types and ranges, in ``__post_init__``)."""

    steps: int = bounded(10_000, lo=1)                          # optimizer steps in the whole run (not epochs)
    batch_size: int = bounded(64, lo=1)                         # GLOBAL batch per optimizer step, summed over
                                                                # processes and accumulation
    lr: float = bounded(2e-4, lo=0.0, lo_open=True)             # peak AdamW learning rate (after warm-up)
    warmup_steps: int = bounded(0, lo=0)                        # linear warm-up: step s uses lr·min(1, (s+1)/warmup);
                                                                # 0 = none
    lr_schedule: Literal[LR_SCHEDULES] = "constant"             # after warm-up: constant, or a linear / cosine
                                                                # decay that reaches 0 at `steps`
    weight_decay: float = bounded(0.0, lo=0.0)                  # AdamW decoupled weight decay (all parameters)
    betas: tuple[float, float] = bounded((0.9, 0.999), lo=0.0, hi=1.0, hi_open=True)  # AdamW (β1, β2)
    adam_eps: float = bounded(1e-8, lo=0.0, lo_open=True)       # AdamW ε
    grad_clip: float = bounded(1.0, lo=0.0)                     # clip each optimizer's grad norm to this; 0 = none
    grad_accum: int = bounded(1, lo=1)                          # micro-batches per optimizer step on each process
    ema_decay: float = bounded(0.9999, lo=0.0, hi=1.0, hi_open=True)  # EMA decay of the weights; 0 = no EMA
    ema_warmup: bool = True                                     # n-th update: decay min(ema_decay, (1+n)/(10+n))
    mixed_precision: Literal[MIXED_PRECISION] = "auto"          # auto = bf16 on CUDA when supported, else no
    seed: int = bounded(0, lo=0)                                # data order, RNGs (+ process index), sample noise
    deterministic: bool = False                                 # torch.use_deterministic_algorithms; with
                                                                # num_workers=0 a resume is bit-exact on CPU
    checkpoint_every: int = bounded(1000, lo=0)                 # steps between checkpoints (one more at the end);
                                                                # 0 = only at the end
    keep_checkpoints: int = bounded(3, lo=0)                    # newest checkpoints kept, older deleted; 0 = all
    sample_every: int = bounded(0, lo=0)                        # steps between sample grids; 0 = never
    sample_num: int = bounded(16, lo=1)                         # images per sample grid
    log_every: int = bounded(10, lo=1)                          # steps averaged per log line (CSV, TensorBoard)
    num_workers: int = bounded(0, lo=0)                         # DataLoader worker processes; 0 = main process
    find_unused_parameters: bool = False                        # DDP: parameters without gradient (GAN phases)
    compile: bool = False                                       # torch.compile the trained networks (first step
                                                                # compiles; its time is printed apart)
    compile_backend: Literal["inductor", "eager", "aot_eager"] = "inductor"  # eager: trace only (a quick check)
    channels_last: bool = False                                 # NHWC weights/activations (GPU tensor cores, oneDNN)
    max_minutes: float = bounded(0.0, lo=0.0, hi=math.inf, hi_open=True)  # stop (with a checkpoint) before a
                                                                # step would end past this; 0 = none; a resumed
                                                                # run gets it anew
    # The run around the loop (``latentdiff train``); the loop itself ignores these.
    cond_drop_prob: float = bounded(0.0, lo=0.0, hi=1.0)        # drop conditioning (null class / empty prompt)
    out_dir: str = "runs/default"                               # checkpoints, samples, logs, the resolved config
    resume: str | None = None                                   # "latest", a checkpoint path, or None = fresh
    init_from: str | None = None                                # a diffusion run or model folder whose weights start a
                                                                # fresh run (text-to-image -> inpainting); new input
                                                                # channels start at zero; None = random weights

    def __post_init__(self):
        check_fields(self)


TrainSection = TrainConfig  # the name of the ``train`` section beside DataSection, SampleSection, ...


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
    karras_range: Literal["schedule", "grid"] = "schedule"      # Karras ends: the schedule's, or the spacing grid's
                                                                # (diffusers' Euler schedulers)
    extra_point: bool = False                                   # leading/linspace grid of steps + 1 points, smallest
                                                                # dropped (diffusers' DPM-Solver / UniPC)
    init_noise: Literal["vp", "sigma"] = "vp"                   # x_T = ε, or √(1 − ᾱ_0)·ε (diffusers' Euler family on
                                                                # linspace / trailing grids)
    round_model_t: bool = False                                 # network sees round(t) on Karras grids (diffusers'
                                                                # DPM-Solver / UniPC)
    set_alpha_to_one: bool | None = None                        # ddim / plms: end at ᾱ = 1 (true) or ᾱ_0 (false,
                                                                # CompVis); null = the sampler's default
    clip_x0: bool = False                                       # clamp predicted x_0 to [-1, 1] (pixel space)
    num: int = bounded(16, lo=1)                                # images to draw
    batch_size: int = bounded(16, lo=1)                         # images per forward pass
    seed: int = 0                                               # sample i uses seed + i
    labels: list[int] | None = None                             # class ids to draw, cycled; None = all classes in turn
    prompt: str | None = None                                   # caption for text models (when none is given)
    prompts: list[str] | None = None                            # text models: captions drawn, cycled; null = [prompt]
    negative_prompt: str | None = None                          # text models: the unconditional branch's prompt;
                                                                # null = ""
    compile: bool = False                                       # torch.compile the U-Net for sampling (the first
                                                                # batch compiles; again for each new batch shape)
    channels_last: bool = False                                 # NHWC U-Net weights/activations
    size: tuple[int, int] | None = None                         # (H, W) of the images in pixels; null = the
                                                                # training size; larger is sampled convolutionally
                                                                # (LDM sec. 4.3.2)


@dataclass
class LatentSection:
    first_stage: str | None = None                              # autoencoder model or run folder; null = pixel-space
                                                                # diffusion. Relative: to the working directory, or (in
                                                                # a saved run or model folder) to that folder
    scale: float | None = bounded(None, lo=0.0, lo_open=True)   # latent scale factor; null = saved with the autoencoder
    sample_posterior: bool = True                               # KL: train on posterior samples (LDM) or their means
    cache: bool = True                                          # encode the data once with the frozen first stage and
                                                                # train on the stored latents (data/latent_cache.py)
    cache_pool: int | None = bounded(20_000, lo=1)              # items cached of an endless procedural dataset
                                                                # (shapes); null = the whole dataset


@dataclass
class ConditioningSection:
    """The conditioner τ_θ of LDM (section 3.3): what the U-Net is conditioned on and how it enters."""
    kind: Literal["text", "class", "layout", "clip"] | None = "text"  # a caption (text encoder), class id (class
                                                                # embedder) or layout of boxes (layout encoder); clip:
                                                                # transformers' CLIP text model (an imported Stable
                                                                # Diffusion, latentdiff.interop); null: only a
                                                                # spatial condition (mode concat)
    mode: Literal["crossattn", "adm", "concat", "hybrid"] = "crossattn"  # crossattn: context for the spatial
                                                                # transformers (text, class); adm: a class embedding
                                                                # added to the time embedding; concat: the spatial
                                                                # condition alone, concatenated to z_t; hybrid:
                                                                # crossattn + concat
    concat: str | None = None                                   # concat, hybrid: the spatial condition's name
                                                                # (latentdiff.spatial: segmentation, ...)
    concat_options: dict[str, Any] = field(default_factory=dict)  # its options (segmentation: classes)
    rescaler: dict[str, Any] | None = None                      # concat, hybrid: SpatialRescalerConfig fields
                                                                # (resize to the latent grid, 1x1 conv); null = as is
    drop_concat: bool = False                                   # guidance's null condition zeroes the spatial input
                                                                # too (default: kept, as LDM's SR / inpainting)
    key: str | None = None                                      # data field of the condition; null = caption / label /
                                                                # layout
    context_length: int | None = bounded(None, lo=2)            # text: tokens incl. the end token; null = the longest
                                                                # caption of the vocabulary pool
    min_count: int = bounded(1, lo=1)                           # text: words seen fewer times map to the unknown token
    vocab_pool: int = bounded(20_000, lo=1)                     # text: captions read to build the vocabulary
    text: dict[str, Any] = field(default_factory=dict)          # TextEncoderConfig fields: width, depth, heads,
                                                                # mlp_ratio, dropout (vocab_size, context_length from
                                                                # the tokenizer)
    num_classes: int | None = bounded(None, lo=1)               # class: classes (+ 1 null class for guidance)
    class_dim: int | None = bounded(None, lo=1)                 # class + crossattn: width of the class token
    layout: dict[str, Any] = field(default_factory=dict)        # layout: LayoutEncoderConfig fields: max_objects,
                                                                # grid (S: corners on an SxS grid), width, depth,
                                                                # heads (num_classes: conditioning.num_classes)

    @property
    def data_key(self) -> str | None:
        """The data field of the text or class condition; None for a spatial condition alone."""
        if self.kind is None:
            return None
        return self.key or {"text": "caption", "layout": "layout"}.get(self.kind, "label")


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=dict)         # {"preset": name, field: value, ...} for the network
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSection = field(default_factory=SampleSection)
    latent: LatentSection = field(default_factory=LatentSection)  # latent diffusion: the first stage to diffuse in
    conditioning: ConditioningSection | None = None              # τ_θ(y); null = the U-Net's own class labels or none


@dataclass
class AutoencoderRunConfig:
    """A run that trains a first stage (``latentdiff train configs/shapes_vae_kl_f4.yaml``). The open sections are
    checked against their classes by :func:`check_autoencoder_sections` (``load_config`` does it)."""
    autoencoder: dict[str, Any] = field(default_factory=dict)   # nn.autoencoder.AutoencoderConfig fields; in/out
                                                                # channels and resolution come from the data
    loss: dict[str, Any] = field(default_factory=dict)          # AutoencoderLossConfig fields
    discriminator: dict[str, Any] | None = None                 # nn.discriminator.DiscriminatorConfig fields;
                                                                # null = no GAN term
    lpips: str | None = None                                    # LPIPS weights (nn/lpips.py); null = no perceptual term
    data: DataSection = field(default_factory=lambda: DataSection(name="shapes"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(ema_decay=0.0))
    eval_num: int = bounded(512, lo=1)                          # held-out images scored (PSNR, SSIM) after training


# The loss weights of the first stage (train/autoencoder_objective.py has the loss itself).
REC_LOSSES = ("l1", "l2")
DISC_LOSSES = ("hinge", "vanilla")


@dataclass
class AutoencoderLossConfig(FromDict):
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
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor",
                     "max_adaptive_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"AutoencoderLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:  # found by tests/test_fuzz_configs.py: a negative start silently meant "from step 0"
            raise ValueError(f"AutoencoderLossConfig.disc_start must be >= 0, got {self.disc_start}")


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


# ---- overrides --------------------------------------------------------------------------------------------


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
        return set_path(config, parts, value, where)
    except ConfigTypeError as first:
        if isinstance(value, str) or not raw.strip():
            raise
        try:
            return set_path(config, parts, raw.strip(), where)
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
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r} (line {line})",
                                                        key_node.start_mark)
            seen.add(k)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e) -> str:
    """A YAML error in one line: what is wrong, and where (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem is None:
        return " ".join(str(e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def read_yaml(path) -> dict:
    """The mapping in a YAML file (empty file -> {}); clear errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
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
