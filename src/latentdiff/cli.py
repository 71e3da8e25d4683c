"""The `latentdiff` command: train, sample, export, reconstruct, eval, oracle.

    latentdiff train configs/digits_ddpm.yaml train.steps=2000 --out runs/digits
    latentdiff sample runs/digits --num 40 --sampler dpmpp_2m --steps 20 --guidance 2 --out grid.png
    latentdiff export runs/digits models/digits
    latentdiff convert sd-1-5/ models/sd15                                   # diffusers folder or SD file <-> ours
    latentdiff train configs/shapes_vae_kl_f4.yaml --out runs/kl_f4          # an autoencoder (first stage)
    latentdiff reconstruct runs/kl_f4 --num 16 --out recon.png
    latentdiff eval runs/kl_f4 --num 1000                                    # PSNR, SSIM, rFID
    latentdiff eval runs/digits --metrics fid,kid,is,pr --num 1000 --sampler ddim --steps 50
    latentdiff eval --real real_images/ --fake samples/ --fid-weights pt_inception-2015-12-05-6726825d.pth
    latentdiff oracle digits
    latentdiff oracle shapes

Heavy imports (torch, the networks) happen inside each subcommand so that `--help` answers at once.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli_parser import build_parser  # noqa: F401  (re-exported: tests and docs call cli.build_parser)
from .errors import RequestError, UserError


class CLIError(RequestError):
    """A command's arguments that do not fit: printed as one line, exit status 2 (as every UserError)."""


def cmd_train(args) -> int:
    from .config import ConfigError, load_config, read_yaml
    from .recipes import find_recipe
    from .train.run import train_from_config

    path = find_recipe(args.config)
    if not read_yaml(path):  # an empty file (or only comments) would train every default: a 10,000-step run
        raise ConfigError(f"{path}: the config file is empty; give at least its data section "
                          "(`latentdiff recipes` lists complete ones)")
    config = load_config(path, args.overrides)
    result = train_from_config(config, args.out, resume=args.resume, progress=not args.quiet)
    print(f"trained to step {result.step}; checkpoint: {result.checkpoint}")
    return 0


def cmd_sample(args) -> int:
    t0 = time.perf_counter()
    from .cli_images import check_image_args, image_inputs
    from .cli_spatial import spatial_inputs, write_spatial_samples
    from .interop import check_text_to_image, load

    check_image_args(args)
    pipe = load(args.model, ema=not args.no_ema)
    check_text_to_image(pipe)
    inputs = image_inputs(args, pipe)  # --image, --mask, --init-image: None without them
    s = pipe.sample_options(num=inputs.num if inputs else args.num, prompts=args.prompts,
                            negative_prompt=args.negative_prompt, labels=args.labels, sampler=args.sampler,
                            steps=args.steps, guidance=args.guidance, eta=args.eta, seed=args.seed,
                            batch_size=args.batch_size, size=args.size)
    spatial, pictures = spatial_inputs(args, pipe, s)  # --layout / --segmentation, checked before sampling
    print(f"loaded {args.model} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    if inputs is not None:  # super-resolution, inpainting, image-to-image (cli_images.py)
        images = inputs.sample(pipe, s, progress=not args.quiet)
        inputs.write(images, Path(args.out), lambda i: _image_task_params(pipe, s, args, i))
        return 0
    images = pipe.sample(s.num, prompts=s.prompts, negative_prompt=s.negative_prompt, labels=s.labels,
                         sampler=s.sampler, steps=s.steps, guidance=s.guidance, eta=s.eta, seed=s.seed,
                         batch_size=s.batch_size, size=s.size, output="tensor", progress=not args.quiet, **spatial)
    if pictures is not None:
        given = {"layout": args.layout} if args.layout else {"segmentation": args.segmentation}
        write_spatial_samples(images, pictures, Path(args.out), pipe, s, spatial,
                              lambda i: {**_generation_params(pipe, s, args, i), **given})
        return 0
    _write_samples(images, Path(args.out), pipe, s, args)
    return 0


def _image_task_params(pipe, s, args, i: int | None) -> dict:
    """The generation parameters of an image-input result: those of `sample` plus its input files."""
    params = _generation_params(pipe, s, args, i)
    params.update({k: str(v) for k, v in (("image", args.image), ("mask", args.mask),
                                          ("init_image", args.init_image)) if v is not None})
    if args.strength is not None:
        params["strength"] = args.strength
    return params


def _generation_params(pipe, s, args, i: int | None = None) -> dict:
    """What made image ``i`` (or a grid, when None): written into its PNG and printed by `latentdiff info`."""
    params = {"model": str(Path(args.model).resolve())}
    if s.prompts is not None:
        params["prompt"] = s.prompts[i % len(s.prompts)] if i is not None else s.prompts
        params["negative_prompt"] = s.negative_prompt or ""
    if pipe.conditioning == "class":
        labels = s.labels or list(range(pipe.num_classes))
        params["class"] = labels[i % len(labels)] if i is not None else labels
    params.update(seed=s.seed + i if i is not None else s.seed, sampler=s.sampler, steps=s.steps,
                  guidance=s.guidance, eta=s.eta, spacing=s.spacing, num=s.num)
    if s.size is not None:
        params["size"] = list(s.size)
    return params


def _write_samples(images, out: Path, pipe, s, args) -> None:
    """One grid PNG (``out`` ends in .png; rows = prompts or classes) or one PNG per image in folder ``out``,
    each carrying its generation parameters in PNG text chunks."""
    from .pipeline import to_pil
    from .pngmeta import save_png

    if out.suffix.lower() == ".png":
        from PIL import Image

        from .train.logging import make_grid

        rows = s.prompts or s.labels or (list(range(pipe.num_classes)) if pipe.num_classes else None)
        nrow = args.nrow or (max(1, len(images) // len(rows)) if s.prompts else None)
        nrow = nrow or (len(rows) if rows else max(1, round(len(images) ** 0.5)))
        if s.prompts and len(s.prompts) > 1 and not args.nrow:
            # Image i has prompt i mod P: reorder so that each grid row holds one prompt.
            order = sorted(range(len(images)), key=lambda i: (i % len(s.prompts), i))
            images = images[order]
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, nrow=nrow)
        grid = grid[..., 0] if grid.shape[-1] == 1 else grid
        save_png(Image.fromarray(grid), out, _generation_params(pipe, s, args))
        print(f"wrote a grid of {len(images)} images to {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        save_png(im, out / f"{i:05d}_seed{s.seed + i}.png", _generation_params(pipe, s, args, i))
    print(f"wrote {len(images)} images to {out}/")


def cmd_info(args) -> int:
    from .pngmeta import format_params, read_png_params

    try:
        params = read_png_params(args.image)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    print(format_params(params))
    return 0


def cmd_export(args) -> int:
    from .folders import AUTOENCODER, AUTOENCODER_RUN, CONFIG_FILE, MODEL, folder_kind

    run = Path(args.run)
    kind = folder_kind(run)
    if kind == AUTOENCODER_RUN:
        from .first_stage import export_run

        scale = export_run(run, Path(args.model_dir))
        print(f"exported the autoencoder of {run} to {args.model_dir} (latent scale {scale:.4f})")
        return 0
    if kind == AUTOENCODER or (kind == MODEL and args.format == "latentdiff"):
        raise CLIError(f"{run} is already a model folder")
    if kind is None:
        raise CLIError(f"{run} is not a run folder: no {CONFIG_FILE}")
    from .interop import load, save

    pipe = load(run, ema=not args.no_ema)
    path = save(pipe, args.model_dir, args.format)
    print(f"exported {'trained' if args.no_ema else 'EMA'} weights of {run} to {path} ({args.format} format)")
    return 0


def cmd_convert(args) -> int:
    from .interop import convert

    summary = convert(args.src, args.out, args.format, ema=not args.no_ema, **(
        {"tokenizer": args.tokenizer} if args.tokenizer else {}))
    print(f"converted {args.src} ({summary['from']}) to {summary['out']} ({summary['to']}): "
          f"U-Net {summary['unet_tensors']} tensors, autoencoder {summary['autoencoder_tensors']}, "
          f"text encoder {summary['text_encoder_tensors']}; prediction {summary['prediction']}, "
          f"sampler {summary['sampler']}{', inpainting' if summary['inpainting'] else ''}")
    return 0


def cmd_reconstruct(args) -> int:
    from .devices import default_device
    from .eval.metrics import psnr, ssim
    from .eval.reconstruction import stack_images
    from .first_stage import check_images, held_out_data, load_first_stage, pairs_grid, reconstruct
    from .train.logging import save_grid

    for name in ("num", "nrow"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.start < 0:
        raise CLIError(f"--start must be >= 0, got {args.start}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--out must be a .png file, got {out}")
    ae, config, source = load_first_stage(args.model, device=default_device(args.device))
    dataset, described, _ = held_out_data(ae, config, args.data, args.split)
    images = stack_images(dataset, args.num, args.start)
    check_images(ae, images)
    gen = None
    if args.sample:
        import torch

        gen = torch.Generator(device=next(ae.parameters()).device).manual_seed(args.seed)
    rec = reconstruct(ae, images, sample=args.sample, generator=gen)
    save_grid(pairs_grid(images, rec), out, nrow=2 * args.nrow)
    print(f"{len(images)} images of {described} through {source}: PSNR {float(psnr(rec, images).mean()):.2f} dB, "
          f"SSIM {float(ssim(rec, images).mean()):.4f}; wrote {out} (each original, then its reconstruction)")
    return 0


def _eval_autoencoder(args, metrics, device, common) -> tuple[dict, Path]:
    """``latentdiff eval`` of an autoencoder: PSNR, SSIM, rFID (+ the rFID of other real images) on held-out images."""
    import dataclasses

    from .eval import run as ev
    from .eval.reconstruction import RECONSTRUCTION_METRICS, evaluate_reconstruction, stack_images
    from .first_stage import check_images, held_out_data, load_first_stage, recorded_data

    bad = [m for m in metrics if m not in RECONSTRUCTION_METRICS]
    if bad:
        raise CLIError(f"{', '.join(bad)}: not a metric of an autoencoder "
                       f"(those are {', '.join(RECONSTRUCTION_METRICS)})")
    ae, config, source = load_first_stage(args.model, device=device)
    split = args.split or "test"
    dataset, described, has_splits = held_out_data(ae, config, args.reference, split)
    images = stack_images(dataset, args.num)
    check_images(ae, images)
    net = info = other = None
    if "rfid" in metrics:
        recorded = config.data if config is not None else recorded_data(ae, str(args.model))
        data_name = args.reference if args.reference is not None else (recorded.name if recorded else None)
        features = ev.choose_features(args.features, data_name=data_name, reference=None, oracle_path=args.oracle)
        net, info = ev.feature_network(features, dataset_name=data_name, **common)
        # The scale of rFID: as many other real images, from the other split, else those after the evaluated ones.
        if has_splits and split in ("train", "test"):
            other_set, _, _ = held_out_data(ae, config, args.reference, "train" if split == "test" else "test")
            other = stack_images(other_set, len(images))
        elif len(dataset) >= 2 * len(images):
            other = stack_images(dataset, len(images), start=len(images))
    model = evaluate_reconstruction(ae, images, metrics=metrics, net=net, other_images=other,
                                    batch_size=args.batch_size or 64, device=device, progress=not args.quiet)
    cfg = ae.config
    result = {"kind": "autoencoder", "model": model, "data": described, "features": info, "source": source,
              "autoencoder": f"{cfg.regularizer.upper()}-f{cfg.f}, latent {cfg.embed_dim}x{cfg.resolution // cfg.f}x"
                             f"{cfg.resolution // cfg.f}", "config": dataclasses.asdict(cfg),
              "model_path": str(args.model)}
    folder = Path(args.model)
    out = Path(args.out) if args.out else folder / "eval" / f"eval_reconstruction_{split}_{len(images)}.json"
    return result, out


def _check_sampling(pipe, args, prompted: bool = False) -> None:
    """The sampling options checked (by the pipeline) before any reference statistics are computed. A text model
    of the shapes world is given its held-out prompts later; the empty prompt stands in for them here."""
    pipe.sample_options(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        batch_size=args.batch_size, eta=args.eta, **({"prompts": [""]} if prompted else {}))


def _eval_folders(args, metrics, device, common) -> tuple[dict, Path | None]:
    """``latentdiff eval --real A --fake B``: the metrics between two image sets."""
    from .data.folder import folder_dataset
    from .eval import run as ev

    if args.model is not None:
        raise CLIError("give a model folder or --real and --fake, not both")
    if args.real is None or args.fake is None:
        raise CLIError("--real and --fake go together: the real images and the folder of generated ones")
    for name in ("bpd", "adherence"):
        if name in metrics:
            raise CLIError(f"{name} needs a model: it is not a metric between two image sets")
    fake_dir = Path(args.fake)
    if not fake_dir.is_dir():
        raise CLIError(f"--fake {fake_dir} is not a folder of images"
                       + ("" if fake_dir.exists() else " (it does not exist)"))
    progress = not args.quiet
    features = ev.choose_features(args.features, data_name=None, reference=args.real, oracle_path=args.oracle)
    net, info = ev.feature_network(features, **common)
    channels = getattr(getattr(net, "config", None), "in_channels", 3)
    fake = folder_dataset(fake_dir, channels=channels)
    bs = args.batch_size or 64
    ref = ev.load_reference(args.real, net, split=args.split, cache=args.cache, max_items=args.max_reference,
                            batch_size=bs, device=device, progress=progress)
    result = ev.evaluate_folders(ref, fake, net, metrics=metrics, batch_size=bs, device=device, progress=progress,
                                 net_info=info, seed=args.seed or 0)
    return result, Path(args.out) if args.out else None


def _eval_model(args, metrics, device, common) -> tuple[dict, Path]:
    """``latentdiff eval MODEL`` of a diffusion model: its samples scored against real images, and bits/dim. A text
    model of the shapes world is scored on held-out prompts: adherence, and the feature metrics against the real
    images of those prompts (eval/prompted.py)."""
    from .data import DATASETS
    from .eval import run as ev
    from .interop import load

    if args.model is None:
        raise CLIError("give a run or model folder to evaluate, or --real A --fake B to compare two image folders")
    progress = not args.quiet
    pipe = load(args.model, ema=not args.no_ema, device=device)
    metrics = ev.parse_metrics(metrics) if metrics is not None else ev.default_metrics(pipe)
    ev.check_metrics(pipe, metrics)
    if metrics[0] in ev.SPATIAL_METRICS:  # layout or miou, alone (check_metrics)
        return _eval_spatial(args, pipe, metrics[0])
    if args.size is not None:
        raise CLIError("--size is for the layout and miou metrics")
    prompted = ev.scores_prompts(pipe)
    _check_sampling(pipe, args, prompted)
    net = ref = info = oracle = None
    if any(m in ev.FEATURE_METRICS for m in metrics):
        data_name = args.reference if args.reference in DATASETS else pipe.config.data.name
        features = ev.choose_features(args.features, data_name=data_name, reference=args.reference,
                                      oracle_path=args.oracle)
        net, info = ev.feature_network(features, dataset_name=data_name, **common)
        # A text model of the shapes world is scored against the real images of its held-out prompts, unless
        # --reference names other real images.
        if not prompted or args.reference is not None:
            ref = ev.load_reference(args.reference, net, pipe=pipe, split=args.split, cache=args.cache,
                                    max_items=args.max_reference,
                                    batch_size=args.batch_size or pipe.config.sample.batch_size, device=device,
                                    progress=progress)
            if ref.info.get("stats_file") and ref.info["kind"] != "stats":
                print(f"reference statistics: {ref.info['stats_file']} (reuse with --reference)")
    if "adherence" in metrics:
        oracle = ev.adherence_oracle(net, oracle_path=args.oracle, cache=args.cache, device=device)
        if info is None:
            acc = (oracle.info.get("test") or {}).get("image_accuracy")
            info = {"name": "oracle:shapes", "fingerprint": oracle.fingerprint(), "oracle_accuracy": acc}
    result = ev.evaluate_model(pipe, net, ref, metrics=metrics, num=args.num, sampler=args.sampler, steps=args.steps,
                               guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, device=device,
                               progress=progress, net_info=info, oracle=oracle,
                               **({} if args.eta is None else {"eta": args.eta}))
    result["model_path"], result["ema"] = str(args.model), not args.no_ema
    return result, Path(args.out) if args.out else ev.default_json_path(args.model, result)


def _eval_spatial(args, pipe, metric: str) -> tuple[dict, Path]:
    """``latentdiff eval MODEL --metrics layout|miou``: held-out layouts (2-3 objects) or maps (tiled to each
    --size) sampled and read back (eval/spatial_scores.py), beside the read-back of the real images."""
    from .eval.spatial_scores import evaluate_layouts, evaluate_semantic
    from .layouts import shapes_config
    from .sample_options import check_size

    _check_sampling(pipe, args)
    config = shapes_config(pipe.config.data)
    s = pipe.sample_options(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                            batch_size=args.batch_size, eta=args.eta)
    options = {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "eta": s.eta, "seed": s.seed,
               "batch_size": s.batch_size, "progress": not args.quiet}
    sizes = args.size or [tuple(pipe.image_shape[1:])]
    for size in sizes:
        check_size(pipe, size)
    if metric == "miou":
        tile = pipe.config.data.size
        bad = [f"{h}x{w}" for h, w in sizes if h % tile or w % tile]
        if bad:
            raise CLIError(f"--size {', '.join(bad)}: the held-out maps are grids of {tile}x{tile} scenes (the "
                           f"training size); use multiples of {tile}")
        scores = evaluate_semantic(pipe, num=args.num, sizes=sizes, config=config, **options)
    else:
        if len(sizes) > 1:
            raise CLIError("--size: the layout metric samples at one size")
        scores = evaluate_layouts(pipe, num=args.num, config=config, size=sizes[0], **options)
    sampling = {k: v for k, v in options.items() if k != "progress"}
    result = {"kind": metric, metric: scores, "sampling": sampling, "model_path": str(args.model),
              "ema": not args.no_ema}
    size_tag = "_".join(f"{h}x{w}" for h, w in sizes)
    out = Path(args.out) if args.out else Path(args.model) / "eval" / (
        f"eval_{metric}_{s.sampler}_{s.steps}_g{s.guidance:g}_{size_tag}_{args.num}.json")
    return result, out


def cmd_eval(args) -> int:
    from .devices import default_device
    from .eval import run as ev
    from .eval.reconstruction import format_reconstruction
    from .folders import is_autoencoder

    autoencoder = args.model is not None and is_autoencoder(args.model)
    if autoencoder:
        metrics = [m.strip() for m in (args.metrics or "psnr,ssim,rfid").split(",") if m.strip()]
    elif args.model is None:
        metrics = ev.parse_metrics(args.metrics or ",".join(ev.DEFAULT_METRICS))
    else:  # checked here; the defaults depend on the model (adherence for a text model of the shapes world)
        metrics = None if args.metrics is None else ev.parse_metrics(args.metrics)
    for name in ("num", "max_reference", "batch_size", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    device = default_device(args.device)
    common = {"fid_weights": args.fid_weights, "oracle_path": args.oracle, "cache": args.cache, "device": device}
    if args.real is not None or args.fake is not None:
        evaluate, table = _eval_folders, ev.format_table
    elif autoencoder:
        evaluate, table = _eval_autoencoder, format_reconstruction
    else:
        evaluate, table = _eval_model, ev.format_table
    result, out = evaluate(args, metrics, device, common)
    result["device"] = str(device)
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if result.get("kind") in ("layout", "miou"):
        from .eval.spatial_scores import format_result as table
    print(table(result))
    if out is not None:
        ev.write_json(out, result)
        print(f"wrote {out}")
    return 0


def cmd_oracle(args) -> int:
    from .eval import run as ev
    from .eval.oracle import train_digits_oracle

    if args.epochs is not None and args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    out = Path(args.out) if args.out else ev.cache_root(args.cache) / "oracles" / args.dataset
    if args.dataset == "shapes":
        from .eval.shapes_oracle import train_shapes_oracle

        oracle, scores = train_shapes_oracle(out, epochs=args.epochs or 5, seed=args.seed, verbose=False)
        print(f"oracle 'shapes': test image accuracy {scores['image_accuracy']:.4f} on {oracle.info['n_test']} "
              f"held-out real images (every object's shape, colour and cell right; "
              f"object accuracy {scores['object_accuracy']:.4f}; {oracle.info['train_seconds']} s); saved to {out}")
        return 0
    oracle, acc = train_digits_oracle(out, epochs=args.epochs or 30, seed=args.seed, verbose=False)
    print(f"oracle {args.dataset!r}: test accuracy {acc:.4f} on {oracle.info['n_test']} held-out real images "
          f"(train {oracle.info['train_accuracy']:.4f}, {oracle.info['train_seconds']} s); saved to {out}")
    return 0


def cmd_serve(args) -> int:
    """``latentdiff serve``: load the models, then run the page and the API with uvicorn until SIGTERM / Ctrl-C."""
    t0 = time.perf_counter()
    from .serve import LOCAL_HOSTS

    if args.host not in LOCAL_HOSTS and not args.token:
        raise CLIError(f"--host {args.host} makes the server reachable from other machines: give --token too")
    for name in ("max_queue", "max_steps", "max_images", "max_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_upload_mb <= 0 or args.grace < 0:
        raise CLIError("--max-upload-mb must be > 0 and --grace >= 0")
    try:
        import uvicorn

        from .serve.app import create_app
        from .serve.schema import Limits
    except ImportError as e:
        raise CLIError(f"latentdiff serve needs the serve extra (pip install 'latentdiff[serve]'): {e}") from None
    import logging

    from .devices import default_device
    from .serve import load_models

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    models = load_models(args.models, device=default_device(args.device))
    limits = Limits(max_steps=args.max_steps, max_images=args.max_images, max_size=args.max_size,
                    max_upload_bytes=int(args.max_upload_mb * 2**20), max_queue=args.max_queue)
    app = create_app(models, out_dir=args.out, limits=limits, token=args.token, grace=args.grace)
    print(f"loaded {len(models)} model(s) in {time.perf_counter() - t0:.2f} s; serving on "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    # uvicorn shuts down on SIGTERM (the lifespan finishes or cancels the jobs), then raises the signal again for
    # the handler found before it started: this one, so that a clean shutdown exits with status 0.
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info", access_log=False,
                timeout_graceful_shutdown=max(1, int(args.grace)))
    print("latentdiff serve: stopped", file=sys.stderr)
    return 0


def cmd_recipes(args) -> int:
    """``latentdiff recipes``: each shipped recipe's name and description, one line each."""
    from .recipes import list_recipes

    recipes = list_recipes()
    width = max(len(name) for name, _ in recipes)
    for name, description in recipes:
        print(f"{name:<{width}}  {description}".rstrip())
    return 0


def cmd_shard(args) -> int:
    from .data.shards import shard_folder

    if args.shard_size < 1:
        raise CLIError(f"--shard-size must be >= 1, got {args.shard_size}")
    written = shard_folder(args.folder, args.out, shard_size=args.shard_size)
    print(f"wrote {len(written)} shard(s) to {args.out}")
    return 0


def cmd_encode(args) -> int:
    import torch

    from .data.latent_shards import dist_env, encode_shards
    from .data.shards import expand_urls
    from .first_stage import load_first_stage

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    expand_urls(args.data)  # a missing shard is named before the autoencoder loads
    rank, world, local = dist_env()
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    ae, _, source = load_first_stage(args.first_stage, device=device)
    size = args.size or ae.config.resolution
    done = encode_shards(args.data, ae, args.out, size=size, batch_size=args.batch_size, rank=rank, world_size=world,
                         device=device, progress=not args.quiet)
    print(f"rank {rank}/{world}: encoded {len(done['encoded'])} shard(s), {len(done['skipped'])} already done"
          + (f"; all shards complete in {args.out}" if done["complete"] else ""))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "export": cmd_export, "convert": cmd_convert,
            "reconstruct": cmd_reconstruct,
            "eval": cmd_eval, "oracle": cmd_oracle, "info": cmd_info, "recipes": cmd_recipes, "shard": cmd_shard,
            "encode": cmd_encode, "serve": cmd_serve}


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes the key=value overrides only before the first option; accept them anywhere.
        if args.command == "train" and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except (UserError, OSError) as e:
        # The user's input (a config, data, a folder, an option) or the system (a file that cannot be read or
        # written): one line that names it, no traceback. Anything else is a bug and keeps its traceback.
        print(f"latentdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"latentdiff {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
