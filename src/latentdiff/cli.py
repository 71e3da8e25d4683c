"""The `latentdiff` command: train, sample, export.

    latentdiff train configs/digits_ddpm.yaml train.steps=2000 --out runs/digits
    latentdiff sample runs/digits --num 40 --sampler dpmpp_2m --steps 20 --guidance 2 --out grid.png
    latentdiff export runs/digits models/digits

Heavy imports (torch, the networks) happen inside each subcommand so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default; flags
    (store_true, default off) and options whose default is None say it in their own words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _fmt():
    return _HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentdiff", description="Denoising and latent diffusion models: train, sample, export. Run `latentdiff COMMAND --help` for the options of each command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML config", formatter_class=_fmt(),
                       description="Train a model from a YAML config. Any key can be overridden as key=value (e.g. train.steps=500).")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on dotted keys, e.g. train.lr=1e-3 model.channel_mult=[1,2]")
    t.add_argument("--out", default=None, help="run folder (checkpoints, samples, metrics, resolved config); default: the config's train.out_dir")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the run folder (default: start a new run; "
                   "a folder that already holds checkpoints is then an error)")
    t.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")

    s = sub.add_parser("sample", help="draw images from a run or model folder", formatter_class=_fmt(),
                       description="Draw images from a trained model (EMA weights by default) and write a grid PNG or one PNG per image.")
    s.add_argument("model", help="run folder (newest checkpoint) or model folder (from `latentdiff export`)")
    s.add_argument("--num", type=int, default=None, help="number of images (default: the config's sample.num)")
    s.add_argument("--class", dest="labels", type=int, action="append", default=None, metavar="K",
                   help="class id to draw; repeat for several (cycled); default: the config's sample.labels, else every class in turn")
    s.add_argument("--sampler", default=None, help="sampler name: ddpm, ddim, plms, langevin, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc, euler, euler_ancestral, heun (default: the config's)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale s, 1 = none (default: the config's)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the config's)")
    s.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: the config's)")
    s.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the config's)")
    s.add_argument("--no-ema", action="store_true", help="use the trained weights instead of the EMA weights (run folders; default: EMA)")
    s.add_argument("--nrow", type=int, default=None, help="images per grid row (default: number of classes drawn, or sqrt(num))")
    s.add_argument("--out", default="samples.png", help="a .png file for one grid, or a folder for one PNG per image (named NNNNN_seedS.png)")
    s.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")

    e = sub.add_parser("export", help="write a model folder (config + safetensors weights) from a run", formatter_class=_fmt(),
                       description="Write a model folder that `sample` and latentdiff.load read without the training state.")
    e.add_argument("run", help="run folder")
    e.add_argument("model_dir", help="model folder to write")
    e.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA weights (default: EMA)")
    return p


def cmd_train(args) -> int:
    from .config import load_config
    from .train.run import train_from_config

    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"config file {path} not found")
    config = load_config(path, args.overrides)
    result = train_from_config(config, args.out, resume=args.resume, progress=not args.quiet)
    print(f"trained to step {result.step}; checkpoint: {result.checkpoint}")
    return 0


def cmd_sample(args) -> int:
    t0 = time.perf_counter()
    from .pipeline import load
    from .train.logging import save_grid

    pipe = load(args.model, ema=not args.no_ema)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    images = pipe.sample(
        args.num, labels=args.labels, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
        seed=args.seed, batch_size=args.batch_size, output="tensor", progress=not args.quiet,
        **({} if args.eta is None else {"eta": args.eta}),
    )
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        labels = args.labels or pipe.config.sample.labels or (list(range(pipe.num_classes)) if pipe.num_classes else None)
        nrow = args.nrow or (len(labels) if labels else max(1, round(len(images) ** 0.5)))
        save_grid(images, out, nrow=nrow)
        print(f"wrote a grid of {len(images)} images to {out}")
    else:
        from .pipeline import to_pil

        out.mkdir(parents=True, exist_ok=True)
        seed = pipe.config.sample.seed if args.seed is None else args.seed
        for i, im in enumerate(to_pil(images)):
            _save_png_atomic(im, out / f"{i:05d}_seed{seed + i}.png")
        print(f"wrote {len(images)} images to {out}/")
    return 0


def _save_png_atomic(image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_export(args) -> int:
    from .pipeline import CONFIG_FILE, WEIGHTS_FILE, load

    run = Path(args.run)
    if (run / WEIGHTS_FILE).is_file():
        raise CLIError(f"{run} is already a model folder")
    if not (run / CONFIG_FILE).is_file():
        raise CLIError(f"{run} is not a run folder: no {CONFIG_FILE}")
    pipe = load(run, ema=not args.no_ema)
    path = pipe.save(args.model_dir)
    print(f"exported {'trained' if args.no_ema else 'EMA'} weights of {run} to {path}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "export": cmd_export}


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
    except CLIError as e:
        print(f"latentdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, KeyError) as e:
        # Bad input (config, data, model folder; OSError covers missing files and folders): one clear line,
        # no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"latentdiff {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command == "train" else ""
        print(f"latentdiff {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
