"""Train a diffusion model from a resolved config: the glue between configs, data, pipeline and the loop.

``latentdiff train CONFIG`` calls :func:`train_from_config`. The run folder gets the resolved config
(``config.yaml``, with the data's channels and size filled in) before the first step, so that a run killed at
any point can be resumed and sampled from.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from .. import first_stage
from ..config import AutoencoderLossConfig, AutoencoderRunConfig, Config, ConfigError, dump_config, load_config
from ..data import make_dataset
from ..data.shards import ShardStream
from ..errors import DataError, MissingFileError, RequestError
from ..folders import CONFIG_FILE, EXPORT_DIR, FIRST_STAGE_DIR, TOKENIZER_FILE, list_checkpoints
from ..nn.autoencoder import save_autoencoder
from ..nn.tokenizer import WordTokenizer
from ..pipeline import Pipeline
from ..spatial import with_derived_fields
from .autoencoder_objective import AutoencoderObjective
from .guards import launch_rank, run_folder_lock
from .loop import TrainResult, seed_everything, train
from .objective import DiffusionObjective


def resolve_data(config: Config):
    """Build the dataset and fill in ``data.channels`` and ``data.size`` from its first item."""
    dataset = make_dataset(config.data)
    if isinstance(dataset, ShardStream):
        return dataset, _resolve_stream(config, dataset)
    if len(dataset) == 0:
        raise DataError(f"dataset {config.data.name!r} is empty")
    image = dataset[0]["image"]
    if image.ndim != 3 or image.shape[1] != image.shape[2]:
        raise DataError(f"dataset {config.data.name!r} gives images of shape {tuple(image.shape)}; "
                        "expected square (C, H, W)")
    data = dataclasses.replace(config.data, channels=int(image.shape[0]), size=int(image.shape[1]))
    return dataset, dataclasses.replace(config, data=data)


def _resolve_stream(config: Config, stream: ShardStream) -> Config:
    """Streamed shards: ``data.channels`` and ``data.size`` from the first image, or for latent shards (``latentdiff
    encode``) from their latents.json, whose autoencoder must be the config's first stage."""
    from ..data.latent_shards import read_meta

    first = (stream.preview(1) or [None])[0]
    if first is None:
        raise DataError(f"the shards {config.data.root!r} hold no sample")
    if "image" in first:
        if config.data.size is None:
            raise ConfigError(f"data.root {config.data.root!r} holds image shards: set data.size (the images are "
                              "resized to cover it and centre-cropped, so that they batch)")
        c, h, w = first["image"].shape
        return dataclasses.replace(config, data=dataclasses.replace(config.data, channels=int(c), size=int(h)))
    meta = read_meta(Path(stream.urls[0]).parent)
    if meta is None or getattr(config, "latent", None) is None or config.latent.first_stage is None:
        raise ConfigError(f"data.root {config.data.root!r} holds latent shards: give latent.first_stage (the "
                          "autoencoder that `latentdiff encode` used), and keep latents.json beside the shards")
    data = dataclasses.replace(config.data, channels=int(meta["channels"]), size=int(meta["size"]))
    latent = dataclasses.replace(config.latent, cache=False)  # the shards are the cache
    stream.latent_std = config.latent.sample_posterior  # False: train on μ, as the uncached path does
    return dataclasses.replace(config, data=data, latent=latent)


def _check_latent_shards(dataset, pipe: Pipeline) -> None:
    from ..data.latent_cache import autoencoder_hash
    from ..data.latent_shards import read_meta

    meta = read_meta(Path(dataset.urls[0]).parent) if isinstance(dataset, ShardStream) else None
    if meta is not None and meta["autoencoder_sha256"] != autoencoder_hash(pipe.autoencoder):
        raise ConfigError(f"the latent shards in {Path(dataset.urls[0]).parent} were encoded by another autoencoder "
                          f"than latent.first_stage; encode them again with it")


def _probe(dataset, n: int = 1):
    """What the checks read items from: the dataset, or the first items of a stream."""
    return dataset.preview(n) if isinstance(dataset, ShardStream) else dataset


def _data_for_run(config, out_dir: Path):
    """(dataset, config with the data resolved and train.out_dir set); prints one line about the data."""
    dataset, config = resolve_data(config)
    skipped = getattr(dataset, "num_skipped", 0)
    note = f" ({skipped} unreadable image(s) skipped)" if skipped else ""
    count = dataset.num_samples if isinstance(dataset, ShardStream) else len(dataset)
    print(f"data: {count if count is not None else 'streamed'} images from {config.data.name!r}{note}, "
          f"{config.data.channels}x{config.data.size}x{config.data.size}", flush=True)
    return dataset, dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(out_dir)))


def tokenizer_for_run(config: Config, dataset, out_dir: Path, resume) -> WordTokenizer | None:
    """A text model's tokenizer: the run's own when it resumes, else built from the captions of the first
    ``conditioning.vocab_pool`` training items (word level, lower-cased; see nn/tokenizer.py)."""
    from ..data.captions import dataset_captions

    c = config.conditioning
    if c is None or c.kind != "text":
        return None
    saved = out_dir / TOKENIZER_FILE
    if resume and saved.is_file():
        return WordTokenizer.load(saved)
    if config.train.init_from is not None:  # the starting model's words, so that its text encoder still fits
        source = Path(config.train.init_from)
        if not (source / TOKENIZER_FILE).is_file():
            raise ConfigError(f"train.init_from {source}: no {TOKENIZER_FILE} there (a text model's run or model "
                              "folder is needed to start a text model)")
        return WordTokenizer.load(source / TOKENIZER_FILE)
    if isinstance(dataset, ShardStream):
        captions = dataset.captions(c.vocab_pool)
    else:
        captions = dataset_captions(dataset, c.vocab_pool, key=c.data_key)
    try:
        tokenizer = WordTokenizer.build(captions, context_length=c.context_length, min_count=c.min_count)
    except ValueError as e:
        raise ConfigError(f"conditioning: {e}") from None
    print(f"tokenizer: {tokenizer.vocab_size} tokens from {len(captions)} captions, context length "
          f"{tokenizer.context_length}", flush=True)
    return tokenizer


def cached_latents(config: Config, dataset, pipe: Pipeline, fields: list[str], progress: bool = True):
    """The training data as cached first-stage latents (data/latent_cache.py): the frozen autoencoder encodes the
    data once (the first ``latent.cache_pool`` items of it), later runs with the same data and autoencoder reuse
    the cache, and training never runs the encoder."""
    from ..config import to_dict
    from ..data.latent_cache import LatentMoments, build_or_load_latent_cache
    from ..eval.stats_cache import cache_root

    if config.data.flip or config.data.crop == "random":
        warnings.warn("latent.cache stores one encoding per image, so data.flip / data.crop=random augment nothing; "
                      "set latent.cache=false to keep the augmentation", stacklevel=2)
    kl_sample = config.latent.sample_posterior and pipe.autoencoder.config.regularizer == "kl"
    identity = {"data": to_dict(config.data), "length": len(dataset), **_files_identity(dataset)}
    cache = build_or_load_latent_cache(dataset, pipe.autoencoder, root=cache_root() / "latents", identity=identity,
                                       mode="sample" if kl_sample else "mean", pool=config.latent.cache_pool,
                                       fields=fields, progress=progress)
    print(f"latent cache: {len(cache)} items in {cache.folder}", flush=True)
    return LatentMoments(cache)


def _files_identity(dataset) -> dict:
    """What the cache key needs beyond the data section for an image folder, whose files can change under the same
    root: the images' names, sizes and modification times, and a hash of the captions and labels read with them."""
    import hashlib
    import json

    from ..eval.stats_cache import files_fingerprint

    if not isinstance(getattr(dataset, "paths", None), list):
        return {}
    conditions = json.dumps([getattr(dataset, "captions", None), getattr(dataset, "labels", None)], ensure_ascii=False)
    return {"files": files_fingerprint(dataset.paths),
            "conditions": hashlib.sha256(conditions.encode()).hexdigest()[:16]}


def check_conditioning(config: Config, dataset, pipe: Pipeline) -> None:
    """Errors, before any step, for conditioning settings that the model or the data cannot honour; each
    names the config key to change."""
    name = config.data.name
    num_classes = pipe.num_classes
    if pipe.spatial is not None:
        missing = [f for f in pipe.spatial.fields if f not in dataset[0]]
        if missing:
            raise ConfigError(f"conditioning.concat is {pipe.spatial.name!r}, which reads the field(s) {missing} "
                              f"that dataset {name!r} does not give")
        _check_concat_grid(dataset[0], pipe)
        if pipe.conditioning is None:
            dropped = config.conditioning.drop_concat
            if config.train.cond_drop_prob > 0 and not dropped:
                raise ConfigError(f"train.cond_drop_prob is {config.train.cond_drop_prob} but the only condition is "
                                  f"the {pipe.spatial.name}, which is never dropped (conditioning.drop_concat is "
                                  "false); set train.cond_drop_prob=0 or conditioning.drop_concat=true")
            if config.sample.guidance != 1.0 and not dropped:
                raise ConfigError(f"sample.guidance is {config.sample.guidance} but the model has no condition to "
                                  "guide by (conditioning.drop_concat is false); set sample.guidance=1")
            return
    if pipe.takes_layouts:
        key = config.conditioning.data_key
        item = dataset[0]
        if key not in item:
            raise ConfigError(f"conditioning.kind is layout but dataset {name!r} has no {key!r} field (the shapes "
                              "world gives one: rows [class, x0, y0, x1, y1])")
        if item[key].shape[0] > pipe.max_objects:
            raise ConfigError(f"dataset {name!r} has up to {item[key].shape[0]} objects per image but "
                              f"conditioning.layout.max_objects is {pipe.max_objects}")
        if config.sample.labels is not None or config.sample.prompts is not None:
            raise ConfigError("sample.labels / sample.prompts are set but the model is conditioned on layouts")
        return
    if pipe.takes_prompts:
        key = config.conditioning.data_key
        if key not in dataset[0]:
            raise ConfigError(f"conditioning.kind is text but dataset {name!r} has no {key!r} field "
                              "(give the images captions: metadata.jsonl or .txt files)")
        if config.sample.labels is not None:
            raise ConfigError("sample.labels is set but the model is text-conditioned; give sample.prompts")
        return
    if num_classes is None:
        if config.train.cond_drop_prob > 0:
            raise ConfigError(f"train.cond_drop_prob is {config.train.cond_drop_prob} but the model is unconditional "
                              "(model.num_classes is null): there is no condition to drop; set train.cond_drop_prob=0")
        if config.sample.guidance != 1.0:
            raise ConfigError(f"sample.guidance is {config.sample.guidance} but the model is unconditional "
                              "(model.num_classes is null); set sample.guidance=1")
        if config.sample.labels is not None:
            raise ConfigError("sample.labels is set but the model is unconditional (model.num_classes is null)")
        return
    if "label" not in dataset[0]:
        raise ConfigError(f"model.num_classes is {num_classes} but dataset {name!r} has no labels; "
                          "set model.num_classes=null or give the data labels")
    data_classes = getattr(dataset, "num_classes", None)
    if data_classes is not None and data_classes > num_classes:
        raise ConfigError(f"model.num_classes is {num_classes} but dataset {name!r} has {data_classes} classes")


def _check_concat_grid(item: dict, pipe: Pipeline) -> None:
    """ConfigError naming conditioning.rescaler when the spatial condition of the first item, after the
    conditioner's rescaler, does not land on the grid the U-Net runs on (e.g. a pixel-space model given a rescaler
    that halves the map): found here, not as a shape error of the U-Net at the first step."""
    import torch

    batch = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in item.items()
             if k in pipe.spatial.fields + pipe.spatial.optional_fields}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the run's random stream stays untouched
        concat = pipe.spatial.inputs(batch, encode=pipe.encode, generator=torch.Generator().manual_seed(0),
                                     training=True)["concat"]
        if pipe.conditioner.rescaler is not None:
            concat = pipe.conditioner.rescaler(concat)
    want, got = tuple(pipe.sample_shape[1:]), tuple(concat.shape[-2:])
    if got != want:
        raise ConfigError(f"the {pipe.spatial.name} condition reaches the U-Net at {got[0]}x{got[1]} but the "
                          f"diffusion runs at {want[0]}x{want[1]}: set conditioning.rescaler (n_stages, multiplier) "
                          "to resize it onto that grid, or null for none")


def _resume_target(config: Config, resume):
    """The loop's ``resume`` argument from the command's flag and ``train.resume`` ("latest" or a path)."""
    if resume:
        return resume
    if config.train.resume is None:
        return False
    return True if config.train.resume == "latest" else config.train.resume


def _check_out_dir(config, out_dir: Path, resume, same: tuple[str, ...]) -> None:
    """A new run may not reuse a folder with checkpoints; a resumed one must keep the sections ``same``."""
    saved = out_dir / CONFIG_FILE
    if not resume and list_checkpoints(out_dir):
        raise RequestError(f"{out_dir} already holds checkpoints of a run; continue it with --resume (resume=True) "
                           "or choose another --out (nothing there was changed)")
    if resume and saved.is_file():
        previous = load_config(saved)
        if type(previous) is not type(config) or any(getattr(previous, k) != getattr(config, k) for k in same):
            raise ConfigError(f"{saved}: the run was started with another {' or '.join(same)} config; resume with that "
                              "config or use a new --out")


def train_from_config(config, out_dir=None, *, resume: bool | str = False, progress: bool = True,
                      callback=None) -> TrainResult:
    """Train the config's model in ``out_dir`` (default: ``config.train.out_dir``).

    ``resume`` (or ``train.resume: latest``) continues from the newest complete checkpoint there; the model
    and diffusion sections must equal those the run was started with. Without it, a folder that already
    holds checkpoints is an error, and nothing in it is touched. Every check on the config and the data runs
    before the run folder is written.
    """
    if isinstance(config, AutoencoderRunConfig):
        return train_autoencoder_from_config(config, out_dir, resume=resume, progress=progress, callback=callback)
    out_dir = Path(out_dir or config.train.out_dir)
    with run_folder_lock(out_dir, enabled=launch_rank() == 0):  # before anything is read from or written there
        return _train_diffusion(config, out_dir, resume, progress, callback)


def _train_diffusion(config: Config, out_dir: Path, resume, progress: bool, callback) -> TrainResult:
    resume = _resume_target(config, resume)
    saved = out_dir / CONFIG_FILE
    _check_out_dir(config, out_dir, resume, ("model", "diffusion"))
    dataset, config = _data_for_run(config, out_dir)
    own_copy = out_dir / FIRST_STAGE_DIR
    if resume and config.latent.first_stage is not None and own_copy.is_dir():
        # A resumed latent run keeps diffusing in the latents of its own copy of the first stage.
        config = dataclasses.replace(config, latent=dataclasses.replace(config.latent, first_stage=str(own_copy)))
    tokenizer = tokenizer_for_run(config, dataset, out_dir, resume)
    seed_everything(config.train.seed)  # the networks' initial weights depend on the seed alone
    pipe = Pipeline.from_config(config, tokenizer=tokenizer)
    num_classes = pipe.num_classes
    dataset = with_derived_fields(dataset, pipe.spatial)  # e.g. each item's low-resolution image
    check_conditioning(config, _probe(dataset), pipe)
    if config.train.init_from is not None and not (resume and list_checkpoints(out_dir)):
        from .init_weights import init_from_model

        print(init_from_model(pipe, Pipeline.load(config.train.init_from), config.train.init_from), flush=True)
    latent = pipe.autoencoder is not None
    cond_key = None if pipe.conditioning is None else (config.conditioning.data_key if config.conditioning else "label")
    if latent:
        ae = pipe.autoencoder.config
        print(f"latent diffusion in the {ae.regularizer.upper()}-f{ae.f} first stage of {config.latent.first_stage}: "
              f"latents {'x'.join(map(str, pipe.sample_shape))}, scale {pipe.latent_scale:.4f}", flush=True)
        _check_latent_shards(dataset, pipe)
        if config.latent.cache and isinstance(dataset, ShardStream):
            raise ConfigError("latent.cache cannot cache streamed shards: encode them once with `latentdiff encode` "
                              "and train on the latent shards, or set latent.cache=false")
        if config.latent.cache and pipe.spatial is not None and not pipe.spatial.cacheable:
            raise ConfigError(f"latent.cache is true but the {pipe.spatial.name} condition changes at every step "
                              "(random masks: the masked image's latent is encoded anew); set latent.cache=false")
        if config.latent.cache:
            fields = ([cond_key] if cond_key else []) + list(pipe.condition_fields)
            dataset = cached_latents(config, dataset, pipe, fields, progress)
    if pipe.conditioner is not None:
        pipe.conditioner.train()
    objective = DiffusionObjective(
        pipe.unet.train(), pipe.diffusion,
        cond_key=cond_key, num_classes=num_classes if pipe.conditioner is None else None,
        cond_drop_prob=config.train.cond_drop_prob,
        sample_sampler=config.sample.sampler, sample_steps=config.sample.steps,
        latent_encoder=pipe.encode if latent else None, latent_decoder=pipe.decode if latent else None,
        conditioner=pipe.conditioner, latent_scale=pipe.latent_scale, spatial=pipe.spatial,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(out_dir / TOKENIZER_FILE)
    if latent:  # the run carries its first stage, so that it samples and resumes wherever it is moved
        if not own_copy.is_dir():
            save_autoencoder(pipe.autoencoder, str(own_copy), latent_scale=pipe.latent_scale)
        config = dataclasses.replace(config, latent=dataclasses.replace(config.latent, first_stage=FIRST_STAGE_DIR))
    dump_config(config, saved)
    return train(objective, dataset, config.train, out_dir, resume=resume, progress=progress, callback=callback)


def train_autoencoder_from_config(config: AutoencoderRunConfig, out_dir=None, *, resume: bool | str = False,
                                  progress: bool = True, callback=None) -> TrainResult:
    """Train the first stage of ``config`` in ``out_dir`` with the LDM objective; at the end write the model
    folder ``out_dir/autoencoder`` (weights + latent scale from the first training batch) and print PSNR and
    SSIM of held-out images when the dataset has a test split. Checks run before anything is written."""
    out_dir = Path(out_dir or config.train.out_dir)
    with run_folder_lock(out_dir, enabled=launch_rank() == 0):
        return _train_autoencoder(config, out_dir, resume, progress, callback)


def _train_autoencoder(config: AutoencoderRunConfig, out_dir: Path, resume, progress: bool, callback) -> TrainResult:
    resume = _resume_target(config, resume)
    _check_out_dir(config, out_dir, resume, ("autoencoder", "loss", "discriminator"))
    dataset, config = _data_for_run(config, out_dir)
    seed_everything(config.train.seed)  # the initial weights (autoencoder and discriminator) depend on the seed alone
    ae, objective = build_autoencoder_objective(config)
    cfg = ae.config
    n_params = sum(p.numel() for p in ae.parameters())
    print(f"autoencoder: {cfg.regularizer.upper()}, f={cfg.f}, latent {cfg.embed_dim}x{cfg.resolution // cfg.f}"
          f"x{cfg.resolution // cfg.f}, {n_params / 1e6:.2f}M parameters", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, out_dir / CONFIG_FILE)
    result = train(objective, dataset, config.train, out_dir, resume=resume, progress=progress, callback=callback)
    if not _is_main_process():
        return result
    ae = objective._raw("autoencoder").eval()
    first = first_stage.first_images(_probe(dataset, config.train.batch_size), config.train.batch_size)
    scale = first_stage.export(ae, out_dir / EXPORT_DIR, first, seed=config.train.seed, data=config.data)
    print(f"wrote {out_dir / EXPORT_DIR} (latent scale {scale:.4f})", flush=True)
    held_out = _held_out(config)
    if held_out is not None:
        from ..eval.metrics import psnr, ssim

        x = first_stage.first_images(held_out, config.eval_num)
        x_rec = first_stage.reconstruct(ae, x)
        result.metrics.update(eval_psnr=float(psnr(x_rec, x).mean()), eval_ssim=float(ssim(x_rec, x).mean()))
        print(f"held-out {config.data.name!r} test split, {len(x)} images: PSNR {result.metrics['eval_psnr']:.2f} dB, "
              f"SSIM {result.metrics['eval_ssim']:.4f}", flush=True)
    return result


def build_autoencoder_objective(config: AutoencoderRunConfig):
    """(autoencoder, AutoencoderObjective) of a resolved run config: the discriminator when the config has
    one, LPIPS from its local weights file when given."""
    from ..nn.discriminator import DiscriminatorConfig, PatchDiscriminator
    from ..nn.lpips import load_lpips

    ae = first_stage.Autoencoder(first_stage.autoencoder_config(config))
    disc = None
    if config.discriminator is not None:
        disc = PatchDiscriminator(DiscriminatorConfig(**config.discriminator, in_channels=config.data.channels))
    lpips = None
    if config.lpips is not None:
        if not Path(config.lpips).is_file():
            raise MissingFileError(f"lpips: weights file {config.lpips} not found (LPIPS weights are never downloaded; "
                                   "set lpips: null to train without the perceptual term)")
        lpips = load_lpips(config.lpips)
    loss = AutoencoderLossConfig(**config.loss)
    return ae, AutoencoderObjective(ae, discriminator=disc, lpips=lpips, config=loss)


def _held_out(config):
    """The test split of the run's dataset, or None when it has none."""
    from ..data import DATASETS

    entry = DATASETS.get(config.data.name)
    if entry is None or "test" not in entry.splits or config.data.split == "test":
        return None
    return make_dataset(dataclasses.replace(config.data, split="test", flip=False))


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
