"""A trained model as one object: first stage + conditioner + denoising network + Gaussian diffusion.

    pipe = latentdiff.load("runs/digits")          # a run folder (EMA weights of its newest checkpoint) or model folder
    images = pipe.sample(num=10, labels=range(10), guidance=2.0, seed=0)   # list of PIL images
    images = latentdiff.load("runs/txt2img").sample(prompts=["a red circle at the top left"], guidance=3, seed=0)

A model folder holds ``config.yaml`` (the resolved config) and ``model.safetensors`` (the U-Net's weights); a
conditioned model adds ``conditioner.safetensors`` (τ_θ) and, for text, ``tokenizer.json``; a latent model its
first stage in ``first_stage/``. `latentdiff export` writes one from a run. Latent diffusion composes an
autoencoder into the same object (``encode``/``decode``); pixel diffusion is the case without one. Conditioning
composes a conditioner (LDM's τ_θ, ``latentdiff.nn.conditioners``): ε_θ(z_t, t, τ_θ(y)).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import Config, SampleSection, dump_config, load_config, update
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError, MissingFileError, RequestError
from .fileio import atomic_write
from .first_stage import load_first_stage
from .folders import (  # noqa: F401  (CONFIG_FILE, WEIGHTS_FILE, FIRST_STAGE_DIR, resolve_first_stage: re-exported)
    AUTOENCODER,
    AUTOENCODER_RUN,
    CONDITIONER_FILE,
    CONFIG_FILE,
    FIRST_STAGE_DIR,
    MODEL,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    check_config_seal,
    folder_kind,
    load_model_weights,
    model_weights,
    resolve_first_stage,
    save_sealed_model,
)
from .nn.autoencoder import save_autoencoder
from .nn.conditioners import Conditioner, build_conditioner
from .nn.speed import optimize, unoptimized
from .nn.tokenizer import WordTokenizer
from .nn.unet import PRESETS, UNet, UNetConfig
from .sample_inputs import batch_rows, check_conditions, check_edits, edit_options, per_image, step_callback
from .sample_options import check_size, sample_options, warn_ill_conditioned_start
from .schedules import make_betas, rescale_zero_terminal_snr
from .spatial import SpatialCondition, build_spatial
from .spatial_image import Inpaint, LowRes  # noqa: F401  (registers the conditions low_res and inpaint)


def build_diffusion(section) -> GaussianDiffusion:
    """The GaussianDiffusion that a config's ``diffusion`` section describes."""
    betas = make_betas(section.schedule, section.num_steps, **section.schedule_options)
    if section.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return GaussianDiffusion(
        betas, prediction=section.prediction, variance=section.variance, loss=section.loss,
        vlb_weight=section.vlb_weight, min_snr_gamma=section.min_snr_gamma, timestep_sampler=section.timestep_sampler,
    )


def unet_config(config: Config, diffusion: GaussianDiffusion, channels: int, conditioner: Conditioner | None = None,
                spatial: SpatialCondition | None = None) -> UNetConfig:
    """The UNetConfig of ``config.model`` (a preset plus field overrides), with the channels the data and the
    diffusion need (out_channels doubles for a learned variance) and the inputs the conditioner feeds; a spatial
    condition with a label (the noise level of ``low_res``) sets the U-Net's label classes."""
    model = dict(config.model)
    preset = model.pop("preset", None)
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ConfigError(f"model.preset: unknown U-Net preset {preset!r}; known: {', '.join(PRESETS)}")
    model.setdefault("in_channels", channels)
    model.setdefault("out_channels", diffusion.output_channels(channels))
    if conditioner is not None:
        for key, value in conditioner.unet_kwargs().items():
            if key in model and model[key] != value and (value or model[key]):
                raise ConfigError(f"model.{key} is {model[key]!r} but the conditioning section gives the U-Net "
                                  f"{key}={value!r}; remove model.{key}")
            model[key] = value
    if spatial is not None and spatial.adm_classes:
        if model.get("num_classes") not in (None, spatial.adm_classes):
            raise ConfigError(f"model.num_classes is {model['num_classes']!r} but the {spatial.name} condition feeds "
                              f"the U-Net's label {spatial.adm_classes} classes; remove model.num_classes")
        model["num_classes"] = spatial.adm_classes
    return update(PRESETS[preset] if preset else UNetConfig(), model, where="config", prefix="model.")


def conditioner_config(section, tokenizer: WordTokenizer | None) -> dict:
    """The conditioner config (nn.conditioners.ConditionerConfig fields) of a ``conditioning`` section."""
    if section.kind == "clip":
        raise ConfigError("conditioning.kind is clip (a transformers CLIP text model): load this model with "
                          "latentdiff.load, which reads its text_encoder/ and tokenizer/ folders")
    spatial = section.mode in ("concat", "hybrid")
    if spatial != (section.concat is not None):
        raise ConfigError("conditioning.concat names the spatial condition of modes concat and hybrid: "
                          + (f"set it for mode {section.mode}" if spatial else f"remove it for mode {section.mode}"))
    if section.mode == "concat" and section.kind is not None:
        raise ConfigError(f"conditioning.mode is concat (the spatial condition alone) but kind is {section.kind!r}: "
                          "set kind null, or mode hybrid for both")
    if not spatial and (section.rescaler is not None or section.drop_concat or section.concat_options):
        raise ConfigError("conditioning.rescaler, drop_concat and concat_options are for modes concat and hybrid")
    if section.layout and section.kind != "layout":
        raise ConfigError(f"conditioning.layout is for kind layout, not {section.kind!r}; remove it")
    cfg = {"mode": section.mode}
    if section.kind == "text":
        if section.mode not in ("crossattn", "hybrid"):
            raise ConfigError("conditioning: a text condition enters by cross-attention; "
                              "set conditioning.mode=crossattn (or hybrid, with a spatial condition)")
        if tokenizer is None:
            raise ConfigError(f"conditioning.kind is text but there is no tokenizer ({TOKENIZER_FILE}): it is built "
                              "from the training captions when a run starts")
        cfg.update(kind="text", text=dict(section.text))
    elif section.kind == "layout":
        if section.mode not in ("crossattn", "hybrid"):
            raise ConfigError("conditioning: a layout enters by cross-attention; set conditioning.mode=crossattn")
        if section.num_classes is None:
            raise ConfigError("conditioning.kind is layout: set conditioning.num_classes (the object classes)")
        if section.text or section.class_dim is not None:
            raise ConfigError("conditioning.text and class_dim are not for kind layout; use conditioning.layout")
        cfg.update(kind="layout", layout={**section.layout, "num_classes": section.num_classes})
    elif section.kind == "class":
        if section.num_classes is None:
            raise ConfigError("conditioning.kind is class: set conditioning.num_classes")
        if section.text:
            raise ConfigError("conditioning.text is for text conditions; remove it for kind class")
        cfg.update(kind="class", num_classes=section.num_classes)
        if section.mode in ("crossattn", "hybrid"):
            cfg["class_dim"] = section.class_dim or 64
        elif section.class_dim is not None:
            raise ConfigError("conditioning.class_dim is for mode crossattn (mode adm uses the U-Net's label "
                              "embedding)")
    elif section.mode != "concat":
        raise ConfigError(f"conditioning.kind is null (no text or class condition) but mode is {section.mode!r}; "
                          "set mode concat")
    if spatial:
        condition = build_spatial(section.concat, section.concat_options)
        cfg.update(concat_channels=condition.channels, rescaler=section.rescaler, drop_concat=section.drop_concat)
    return cfg


class Pipeline:
    """Networks + process + config, and for latent diffusion the first stage (a frozen autoencoder) with its
    latent scale: ``encode`` maps images to scaled latents z = s·ℰ(x), ``decode`` maps them back, 𝒟(z/s), and
    ``sample`` draws latents and decodes them. ``sample`` takes the same options as ``latentdiff sample``."""

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, config: Config, autoencoder=None,
                 conditioner: Conditioner | None = None):
        self.unet, self.diffusion, self.config = unet.eval(), diffusion, config
        self._fast = None  # the U-Net as sample.compile / sample.channels_last want it, made on first use
        self._prompt_cache: dict[str, dict] = {}  # prompt -> τ_θ(prompt), (1, L, D) per key (text models)
        self.conditioner = None if conditioner is None else conditioner.eval()
        if config.data.channels is None or config.data.size is None:
            raise ConfigError("pipeline config needs data.channels and data.size (a resolved config)")
        self.autoencoder = None if autoencoder is None else autoencoder.eval().requires_grad_(False)
        c = config.conditioning
        # The spatial condition (segmentation map, low-resolution image, mask, ...) of a concat / hybrid model.
        self.spatial: SpatialCondition | None = None
        if c is not None and c.concat is not None:
            self.spatial = _built("conditioning", build_spatial, c.concat, c.concat_options)
        self.latent_scale = None
        if autoencoder is not None:
            self.latent_scale = config.latent.scale or autoencoder.latent_scale
            if self.latent_scale is None:
                raise ConfigError("latent.scale is null and the autoencoder has no saved latent scale "
                                  "(compute one with `latentdiff export` on its run, or set latent.scale)")

    # ---------------------------------------------------------------------------------------------------
    # Construction and files

    @classmethod
    def from_config(cls, config: Config, *, base_dir=None, tokenizer: WordTokenizer | None = None,
                    conditioner: Conditioner | None = None) -> "Pipeline":
        """Fresh (untrained) networks for a resolved config; the first stage (if any) is loaded from its folder,
        resolved against ``base_dir`` (see :func:`resolve_first_stage`); a text conditioner takes ``tokenizer``.
        ``conditioner``: one built elsewhere (latentdiff.interop's CLIP text model) instead of the config's."""
        diffusion = _built("diffusion", build_diffusion, config.diffusion)
        autoencoder, channels = None, config.data.channels
        if config.latent.first_stage is not None:
            autoencoder = load_latent_first_stage(config, base_dir)
            channels = autoencoder.config.embed_dim
        if conditioner is None and config.conditioning is not None:
            spec = conditioner_config(config.conditioning, tokenizer)
            conditioner = _built("conditioning", build_conditioner, spec, tokenizer)
        c = config.conditioning
        spatial = None if c is None or c.concat is None else _built("conditioning", build_spatial, c.concat,
                                                                     c.concat_options)
        unet = UNet(unet_config(config, diffusion, channels, conditioner, spatial))
        return cls(unet, diffusion, config, autoencoder, conditioner)

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional model (the U-Net's label embedding or a class conditioner), else None."""
        if self.conditioner is not None and self.conditioner.kind == "class":
            return self.conditioner.config.num_classes
        if self.spatial is not None and self.spatial.adm_classes:  # the U-Net's label is the condition's (noise level)
            return None
        return self.unet.config.num_classes

    @property
    def takes_prompts(self) -> bool:
        """Whether the model is conditioned on text (``prompts=``)."""
        return self.conditioner is not None and self.conditioner.kind == "text"

    @property
    def takes_layouts(self) -> bool:
        """Whether the model is conditioned on layouts of boxes (``layouts=``)."""
        return self.conditioner is not None and self.conditioner.kind == "layout"

    @property
    def max_objects(self) -> int | None:
        """The most objects a layout of this model holds (None: not a layout model)."""
        return self.conditioner.config.layout.max_objects if self.takes_layouts else None

    @property
    def conditioning(self) -> str | None:
        """"text", "class", "layout" or None (neither): the prompt, label or layout that ``sample`` takes; a spatial
        condition (``condition_fields``) comes on top."""
        if self.takes_layouts:
            return "layout"
        return "text" if self.takes_prompts else ("class" if self.num_classes is not None else None)

    def parse_layouts(self, value) -> torch.Tensor:
        """Layouts (a JSON-style list of objects, a list of such lists, or a (N, K, 5) tensor) -> (N, K, 5) for
        ``sample(layouts=...)``; a RequestError names a bad object (latentdiff.layouts)."""
        from .layouts import parse_layouts, shapes_config

        if not self.takes_layouts:
            raise RequestError(f"this model is not conditioned on layouts (its conditioning: {self.conditioning})")
        return parse_layouts(value, shapes_config(self.config.data), self.max_objects)

    @property
    def condition_fields(self) -> tuple[str, ...]:
        """The fields of the spatial condition (e.g. "segmentation") that its training data gives (and a latent cache
        stores); ``sample(conditions=...)`` needs :attr:`sample_fields`."""
        return self.spatial.fields if self.spatial is not None else ()

    @property
    def sample_fields(self) -> tuple[str, ...]:
        """The fields ``sample(conditions=...)`` needs (inpainting: "image" and "mask")."""
        return self.spatial.required_at_sampling if self.spatial is not None else ()

    @property
    def downsampling_factor(self) -> int:
        """Image sides must be multiples of this: the first stage's f times the U-Net's own downsampling."""
        f = self.autoencoder.f if self.autoencoder is not None else 1
        return f * self.unet.config.downsampling_factor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return (d.channels, d.size, d.size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape the diffusion runs in: the image's, or for latent diffusion the latent's."""
        if self.autoencoder is not None:
            return self.autoencoder.latent_shape(self.config.data.size, self.config.data.size)
        return self.image_shape

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "Pipeline":
        for net in (self.unet, self.autoencoder, self.conditioner):
            if net is not None:
                net.to(device)
        self._prompt_cache.clear()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> what the diffusion runs on: s·ℰ(x) (KL: a posterior sample, or the mean when
        latent.sample_posterior is false), or the images themselves for pixel diffusion."""
        if self.autoencoder is None:
            return images
        if next(self.autoencoder.parameters()).device != images.device:  # e.g. the training loop's device
            self.autoencoder.to(images.device)
        kl_sample = self.config.latent.sample_posterior and self.autoencoder.config.regularizer == "kl"
        z = self.autoencoder.encode(images, sample=kl_sample, generator=generator)
        return z * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: 𝒟(z/s) in [-1, 1] (pixel diffusion: z clamped)."""
        if self.autoencoder is None:
            return z.clamp(-1, 1)
        if next(self.autoencoder.parameters()).device != z.device:
            self.autoencoder.to(z.device)
        return self.autoencoder.decode(z / self.latent_scale).clamp(-1, 1)

    def save(self, path) -> Path:
        """Write a model folder: config.yaml and model.safetensors, each replaced atomically; a latent model
        also gets its first stage in ``first_stage/`` (with the latent scale), which the config then names."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config
        if self.autoencoder is not None:
            save_autoencoder(self.autoencoder, str(path / FIRST_STAGE_DIR), latent_scale=self.latent_scale)
            config = dataclasses.replace(config, latent=dataclasses.replace(config.latent, first_stage=FIRST_STAGE_DIR))
        dump_config(config, path / CONFIG_FILE)
        # Sealed (folders.py): the weights carry the sha256 of their tensors and of config.yaml, checked by load.
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_sealed_model(self.unet, tmp, config=path / CONFIG_FILE))
        if hasattr(self.conditioner, "save_folders"):  # latentdiff.interop's CLIP: its own transformers folders
            self.conditioner.save_folders(path)
        elif self.conditioner is not None:
            if self.conditioner.tokenizer is not None:
                self.conditioner.tokenizer.save(path / TOKENIZER_FILE)
            atomic_write(path / CONDITIONER_FILE, lambda tmp: save_sealed_model(self.conditioner, tmp))
        return path

    @classmethod
    def load(cls, path, *, ema: bool = True, device=None) -> "Pipeline":
        """Load a model folder (config.yaml + model.safetensors) or a run folder (its newest complete
        checkpoint; EMA weights unless ``ema=False``)."""
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"{path} does not exist")
        kind = folder_kind(path)
        if kind in (AUTOENCODER, AUTOENCODER_RUN):
            raise CheckpointError(f"{path} holds an autoencoder (first stage), not a diffusion model: `latentdiff "
                                  "reconstruct` and `latentdiff eval` read it; "
                                  "latentdiff.first_stage.load_first_stage loads it")
        if kind is None:
            raise MissingFileError(f"{path} is not a latentdiff run or model folder: no {CONFIG_FILE} in it")
        if kind == MODEL:
            check_config_seal(path / WEIGHTS_FILE, path / CONFIG_FILE)
        config = load_config(path / CONFIG_FILE)
        pipe = cls.from_config(config, base_dir=path, tokenizer=load_tokenizer(path, config))
        load_model_weights(pipe.unet, model_weights(path, "unet", ema=ema))
        if pipe.conditioner is not None:
            load_model_weights(pipe.conditioner, model_weights(path, "cond", ema=ema))
        if device is not None:
            pipe.to(device)
        return pipe.eval()

    def eval(self) -> "Pipeline":
        for net in (self.unet, self.autoencoder, self.conditioner):
            if net is not None:
                net.eval()
        return self

    # ---------------------------------------------------------------------------------------------------
    # Sampling

    def model_fn(self, x, t, **cond):
        return self._sampling_unet()(x, t, **cond)

    def _sampling_unet(self):
        """The U-Net as sample.compile / sample.channels_last ask (compiled once, on first use)."""
        s = self.config.sample
        if not (s.compile or s.channels_last):
            return self.unet
        if self._fast is None or unoptimized(self._fast) is not self.unet:
            self._fast = optimize(self.unet, compile=s.compile, channels_last=s.channels_last)
        return self._fast

    def _labels(self, labels, num: int) -> torch.Tensor | None:
        """The class of each of ``num`` samples: ``labels`` (checked by :meth:`sample_options`) cycled, or every
        class in turn; None for an unconditional model."""
        if self.num_classes is None:
            return None
        labels = labels or list(range(self.num_classes))
        return torch.tensor([labels[i % len(labels)] for i in range(num)], dtype=torch.long)

    def _conditions(self, s: SampleSection, y: torch.Tensor | None, conditions: dict | None, start: int, n: int,
                    layouts: torch.Tensor | None = None) -> tuple[dict, dict | None]:
        """U-Net keyword arguments of samples start .. start+n-1, conditional and unconditional (for guidance):
        τ_θ of their prompts and of the negative prompt (text), their class and the null class (class), their
        layout (cycled) and the empty one (layout), and the
        spatial condition made from their rows of ``conditions`` (kept in the unconditional branch unless the
        conditioner's ``drop_concat``)."""
        guided = s.guidance != 1.0
        if self.conditioner is None:  # the U-Net's own class labels, or nothing
            if y is None:
                return {}, None
            label = y[start : start + n].to(self.device)
            null = torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
            return {"y": label}, ({"y": null} if guided else None)
        batch = {}
        if self.takes_prompts:
            batch["prompt"] = [s.prompts[(start + i) % len(s.prompts)] for i in range(n)]
        elif layouts is not None:
            batch["layout"] = layouts[torch.arange(start, start + n) % len(layouts)].to(self.device)
        elif y is not None:
            batch["label"] = y[start : start + n].to(self.device)
        extra = {}
        if self.spatial is not None:
            rows = {k: batch_rows(v, start, n) if k in self.sample_fields or per_image(v) else v
                    for k, v in conditions.items()}
            rows = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in rows.items()}
            gen = torch.Generator().manual_seed(s.seed + start)  # noise augmentation, posterior samples
            extra = self.spatial.inputs(rows, encode=lambda x: self.encode(x, generator=gen), generator=gen)
            batch["concat"] = extra.pop("concat").to(self.device)
            extra = {k: v.to(self.device) for k, v in extra.items()}  # a label of the condition (noise level): y
        elif self.takes_prompts:  # text alone: τ_θ of each distinct prompt once (encode_prompts' cache)
            negative = [s.negative_prompt or ""] * n
            return self.encode_prompts(batch["prompt"]), (self.encode_prompts(negative) if guided else None)
        cond = {**self.conditioner(batch), **extra}
        if not guided:
            return cond, None
        null = self.conditioner.null_like(batch)
        if self.takes_prompts:
            null["prompt"] = [s.negative_prompt or ""] * n
        return cond, {**self.conditioner(null), **extra}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], cache_size: int = 4096) -> dict:
        """τ_θ of each prompt (U-Net keyword arguments, batched), each distinct prompt encoded once and cached: a
        sampling run repeats its prompts in every batch, and the negative prompt in every one. Prompts not yet
        cached are encoded one at a time, so a prompt's encoding never depends on the others of its batch. Code that
        changes the conditioner's weights in place clears ``_prompt_cache`` (``to`` does)."""
        for p in dict.fromkeys(prompts):
            if p not in self._prompt_cache:
                if len(self._prompt_cache) >= cache_size:
                    self._prompt_cache.clear()
                self._prompt_cache[p] = self.conditioner({"prompt": [p]})
        return {k: torch.cat([self._prompt_cache[p][k] for p in prompts]) for k in self._prompt_cache[prompts[0]]}

    def sample_shape_at(self, size: tuple[int, int] | None) -> tuple[int, int, int]:
        """The shape the diffusion runs in for images of ``size`` = (H, W) pixels (None: the training size). A
        larger size is sampled convolutionally: the U-Net is applied to a larger latent (LDM sec. 4.3.2)."""
        if size is None:
            return self.sample_shape
        h, w = size
        if self.autoencoder is not None:
            return self.autoencoder.latent_shape(h, w)
        return (self.config.data.channels, h, w)

    @torch.no_grad()
    def sample(
        self,
        num: int | None = None,
        *,
        prompts=None,               # text models: caption(s), cycled over the samples; None = the config's
        negative_prompt: str | None = None,  # text models: the unconditional branch's prompt (None: the config's, "")
        labels=None,                # class id(s), cycled over the samples; None = the config's, else each class in turn
        sampler: str | None = None,  # a name of latentdiff.samplers.SAMPLERS; None = the config's
        steps: int | None = None,   # network evaluations grid; None = the config's
        guidance: float | None = None,  # classifier-free guidance scale s (1 = none); None = the config's
        seed=None,                  # int: sample i uses seed + i whatever the batch; a list: one seed per sample;
                                    # None = the config's
        batch_size: int | None = None,
        size=None,                  # (H, W) in pixels; None = the training size; larger is sampled convolutionally
        output: str = "pil",        # "pil" (list of images), "tensor" ((N, C, H, W) in [-1, 1]) or "latent" (undecoded)
        progress: bool = False,
        model_fn=None,              # the network call; None = self.model_fn (pass a wrapper of it to count calls)
        callback=None,              # callback(start, i, t, x, x0_hat) after step i of the batch of samples start..;
                                    # x0_hat is in the diffusion's space (latents for latent models); raise to stop
        conditions: dict | None = None,  # spatial models: the condition's fields (e.g. {"segmentation": (N|1, H, W)}),
                                    # N rows or 1 shared; the image size follows them unless ``size`` is given
        layouts=None,               # layout models: a list of {"shape", "colour", "box"} objects, a list of such
                                    # lists (cycled over the samples) or a (N, K, 5) tensor (latentdiff.layouts)
        init_image=None,            # image-to-image (SDEdit) or training-free inpainting: (N|1, C, H, W) in [-1, 1];
                                    # latent models encode it
        strength: float | None = None,  # image-to-image: the share of the grid run from init_image, in (0, 1]
        mask=None,                  # training-free inpainting (RePaint) of init_image: (N|1, 1, H, W) in [0, 1],
                                    # 1 = generate, 0 = keep; latent models take it onto the latent grid
        **options,                  # further options of latentdiff.samplers.sample (eta, spacing, karras, ...)
    ):
        from .samplers import SAMPLER_OPTIONS
        from .samplers import sample as run_sampler

        if output not in ("pil", "tensor", "latent"):
            raise RequestError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        routed = ("eta", "spacing", "offset", "karras", "clip_x0", "guidance_rescale", "karras_range", "extra_point",
                  "init_noise", "round_model_t", "set_alpha_to_one")  # sample-section options
        seeds = None
        if isinstance(seed, (list, tuple)):  # one seed per sample (a server batching several requests)
            seeds, seed = [int(v) for v in seed], (int(seed[0]) if seed else None)
        s = self.sample_options(num=num, prompts=prompts, negative_prompt=negative_prompt, labels=labels,
                                sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                                size=size, **{k: v for k, v in options.items() if k in routed})
        if seeds is not None and len(seeds) != s.num:
            raise RequestError(f"got {len(seeds)} seeds for {s.num} samples; give one seed per sample or one int")
        seeds = seeds or [s.seed + i for i in range(s.num)]
        conditions = check_conditions(self, conditions, s.num)
        if layouts is not None or self.takes_layouts:
            if layouts is None:
                raise RequestError("this model is conditioned on layouts: give layouts=[{\"shape\", \"colour\", "
                                   "\"box\"}, ...] (latentdiff sample --layout FILE)")
            layouts = self.parse_layouts(layouts)
        if conditions is not None and s.size is None:
            implied = self.spatial.image_size(conditions)
            if implied is not None and tuple(implied) != self.image_shape[1:]:
                check_size(self, implied)
                s = dataclasses.replace(s, size=list(implied))
        if init_image is not None or strength is not None or mask is not None:
            s = check_edits(self, init_image, strength, mask, s)
        opts = {k: getattr(s, k) for k in routed if getattr(s, k) is not None}  # set_alpha_to_one None: the sampler's
        if "set_alpha_to_one" not in options and "set_alpha_to_one" not in SAMPLER_OPTIONS[s.sampler]:
            opts.pop("set_alpha_to_one", None)  # the config's ddim/plms setting does not bind other samplers
        if s.sampler != self.config.sample.sampler:  # an imported scheduler's own conventions bind its sampler only
            for k in ("karras_range", "extra_point", "init_noise", "round_model_t"):
                if k not in options:
                    opts.pop(k, None)
        opts.update({k: v for k, v in options.items() if k not in routed})
        warn_ill_conditioned_start(self, opts)
        y = None if self.takes_prompts or self.takes_layouts else self._labels(s.labels, s.num)
        model_fn = self.model_fn if model_fn is None else model_fn
        shape = self.sample_shape_at(s.size)
        out = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=s.num * s.steps, desc=f"{s.sampler} x{s.steps}", unit="step", leave=False)
        for start in range(0, s.num, s.batch_size):
            n = min(s.batch_size, s.num - start)
            noise = torch.empty(n, *shape, device=self.device)
            cond, uncond = self._conditions(s, y, conditions, start, n, layouts)
            cb = step_callback(bar, callback, start, n)
            if init_image is not None:
                opts.update(edit_options(self, init_image, strength, mask, start, n, seeds[start]))
            x = run_sampler(
                model_fn, noise, diffusion=self.diffusion, sampler=s.sampler, steps=s.steps,
                seed=seeds[start : start + n], guidance_scale=s.guidance, uncond=uncond, callback=cb,
                **opts, **cond,
            )
            if self.autoencoder is not None and output != "latent":
                x = self.decode(x)
            out.append(x.float().cpu())
        if bar is not None:
            bar.close()
        if output == "latent":  # what the diffusion ran on, before the first stage's decoder (scaled latents)
            return torch.cat(out)
        images = torch.cat(out).clamp(-1, 1)
        return images if output == "tensor" else to_pil(images)

    def sample_options(self, **given) -> SampleSection:
        """The config's sample section with the ``given`` values in place, checked against this model
        (``latentdiff.sample_options.sample_options``: the rules, and which error names which option)."""
        return sample_options(self, **given)


def _built(section: str, build, *args):
    """``build(*args)`` from values of the config's ``section``; a value it refuses (its ValueError) is a
    ConfigError that names the section."""
    try:
        return build(*args)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{section}: {e}") from None


def load_latent_first_stage(config: Config, base_dir=None):
    """The frozen autoencoder that ``config.latent.first_stage`` names, checked against the data section."""
    folder = resolve_first_stage(config.latent.first_stage, base_dir)
    try:
        autoencoder, _, _ = load_first_stage(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"latent.first_stage: {e}") from None
    cfg, data = autoencoder.config, config.data
    if data.channels != cfg.in_channels:
        raise ConfigError(f"latent.first_stage {folder} takes {cfg.in_channels}-channel images; "
                          f"the data has {data.channels}")
    if data.size % cfg.f:
        raise ConfigError(f"latent.first_stage {folder} has f={cfg.f}, which does not divide data.size={data.size}")
    if config.sample.clip_x0:
        raise ConfigError("sample.clip_x0 clamps x̂_0 to [-1, 1], which is for pixels, not latents; "
                          "set sample.clip_x0=false")
    return autoencoder


def load_tokenizer(folder, config: Config) -> WordTokenizer | None:
    """The tokenizer saved in a run or model folder of a text-conditioned model (None for other models)."""
    if config.conditioning is None or config.conditioning.kind != "text":
        return None
    f = Path(folder) / TOKENIZER_FILE
    if not f.is_file():
        raise MissingFileError(f"{folder} is a text-conditioned model but has no {TOKENIZER_FILE}")
    try:
        return WordTokenizer.load(f)
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from None


def to_pil(images: torch.Tensor) -> list:
    """(N, C, H, W) in [-1, 1] -> list of PIL images (L for 1 channel, RGB for 3)."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def load(path, *, ema: bool = True, device=None) -> Pipeline:
    """Load a run or model folder as a :class:`Pipeline` (see :meth:`Pipeline.load`)."""
    return Pipeline.load(path, ema=ema, device=device)


