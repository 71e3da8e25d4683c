"""The argument parsers of the `latentdiff` command (one function per subcommand); ``cli.py`` runs them.

Every option states its default in its help (``_HelpFormatter`` appends it where the help does not say it).
"""

from __future__ import annotations

import argparse


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
    p = argparse.ArgumentParser(prog="latentdiff", description="Denoising and latent diffusion models: train, sample, "
                                "export, evaluate. Run `latentdiff COMMAND --help` for the options of each command.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    sub.add_parser("recipes", help="list the shipped recipes, one line each (train one: latentdiff train NAME)")
    _add_sample_parser(sub)
    _add_export_parser(sub)
    _add_reconstruct_parser(sub)
    _add_eval_parser(sub)
    _add_oracle_parser(sub)
    _add_shard_parsers(sub)
    _add_serve_parser(sub)
    i = sub.add_parser("info", help="print the generation parameters stored in a PNG that `sample` wrote",
                       formatter_class=_fmt())
    i.add_argument("image", help="a PNG written by `latentdiff sample`")
    return p


def _add_shard_parsers(sub) -> None:
    h = sub.add_parser("shard", help="write an image folder as webdataset tar shards (for streamed training)",
                       formatter_class=_fmt(), description="Copy the images of FOLDER (with their captions and labels: "
                       "metadata.jsonl, .txt files or subfolders) into OUT/shard-000000.tar, ... and OUT/index.json.")
    h.add_argument("folder", help="image folder")
    h.add_argument("out", help="output folder (must not hold shards yet)")
    h.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    e = sub.add_parser("encode", help="encode sharded images once into sharded first-stage latents",
                       formatter_class=_fmt(), description="Encode webdataset shards with a frozen autoencoder into "
                       "OUT/latents-*.tar (posterior mean and std + the captions). Resumes after a kill; under "
                       "`accelerate launch` each process encodes its own shards. Train on them with data.name=shards "
                       "data.root=OUT.")
    e.add_argument("data", help="shards: a path, folder, glob, brace range {000..009} or pipe:COMMAND")
    e.add_argument("--first-stage", required=True, help="autoencoder model folder or run folder")
    e.add_argument("--out", required=True, help="output folder of the latent shards")
    e.add_argument("--size", type=int, default=None, help="image side in pixels; default: the autoencoder's "
                   "training resolution")
    e.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    e.add_argument("--quiet", action="store_true", help="no line per shard")


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML config", formatter_class=_fmt(),
                       description="Train a model from a YAML config. Any key can be overridden as key=value "
                       "(e.g. train.steps=500).")
    t.add_argument("config", help="YAML config file, or the name of a shipped recipe (see `latentdiff recipes`)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides on dotted keys, e.g. train.lr=1e-3 model.channel_mult=[1,2]")
    t.add_argument("--out", default=None, help="run folder (checkpoints, samples, metrics, resolved config); "
                   "default: the config's train.out_dir")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in the run "
                   "folder (default: start a new run; a folder that already holds checkpoints is then an error)")
    t.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")


def _add_sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw images from a run or model folder", formatter_class=_fmt(),
                       description="Draw images from a trained model (EMA weights by default) and write a grid PNG "
                       "or one PNG per image.")
    s.add_argument("model", help="run folder (newest checkpoint) or model folder (from `latentdiff export`)")
    s.add_argument("--num", type=int, default=None, help="number of images (default: the config's sample.num)")
    s.add_argument("--prompt", dest="prompts", action="append", default=None, metavar="TEXT",
                   help="text models: the caption to draw; repeat for several (cycled; with a grid, one row each); "
                   "default: the config's sample.prompts")
    s.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="text models: the caption the guidance steers away from (the unconditional branch; "
                   "default: \"\")")
    s.add_argument("--class", dest="labels", type=int, action="append", default=None, metavar="K",
                   help="class id to draw; repeat for several (cycled); default: the config's sample.labels, "
                   "else every class in turn")
    s.add_argument("--size", type=_size, default=None, metavar="HxW",
                   help="image size in pixels (default: the training size); larger is sampled convolutionally")
    s.add_argument("--layout", default=None, metavar="FILE",
                   help="layout models: a JSON list of {\"shape\", \"colour\", \"box\": [x0, y0, x1, y1]} (box in "
                   "[0, 1], y down), or a list of such lists (cycled; one grid row each); default: none")
    s.add_argument("--segmentation", default=None, metavar="FILE",
                   help="semantic synthesis models: a PNG map of class ids (greyscale or palette PNG, or the "
                   "palette-coloured maps this command writes); the image size follows the map; default: none")
    s.add_argument("--sampler", default=None, help="sampler name: ddpm, ddim, plms, langevin, dpmpp_2m, dpmpp_3m, "
                   "dpmpp_2m_sde, unipc, euler, euler_ancestral, heun (default: the config's)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale s, 1 = none (default: the config's)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the config's)")
    s.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: the config's)")
    s.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the config's)")
    s.add_argument("--no-ema", action="store_true",
                   help="use the trained weights instead of the EMA weights (run folders; default: EMA)")
    s.add_argument("--nrow", type=int, default=None,
                   help="images per grid row (default: number of classes drawn, or sqrt(num))")
    s.add_argument("--out", default="samples.png",
                   help="a .png file for one grid, or a folder for one PNG per image (named NNNNN_seedS.png)")
    s.add_argument("--quiet", action="store_true", help="no progress bar (default: show it)")
    _add_image_args(s)


def _add_image_args(s) -> None:
    """`sample`'s image inputs: super-resolution, inpainting, image-to-image (cli_images.py)."""
    s.add_argument("--image", default=None, metavar="PATH",
                   help="super-resolution models: the low-resolution image (or a folder of them; each is upscaled, "
                   "larger ones convolutionally); inpainting models: the image to fill (default: none)")
    s.add_argument("--tile", action="store_true", help="super-resolution: upscale inputs larger than the training "
                   "size in overlapping tiles of that size, blended at the seams (default: whole, convolutionally)")
    s.add_argument("--mask", default=None, metavar="PATH", help="inpainting models: a single-channel mask the size "
                   "of --image, white = fill, black = keep (default: none)")
    s.add_argument("--init-image", default=None, metavar="PATH", help="image-to-image (SDEdit), any model: start "
                   "from this image (a latent model's first stage encodes it) noised to --strength (default: none)")
    s.add_argument("--strength", type=float, default=None, help="image-to-image: the share of the sampling steps "
                   "run from --init-image, in (0, 1]; 1 ignores the image (default: 0.6)")


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a model folder (config + safetensors weights) from a run",
                       formatter_class=_fmt(),
                       description="Write a model folder that `sample` and latentdiff.load read without the training "
                       "state. For an autoencoder run: its newest checkpoint with the latent scale computed on the "
                       "first training batch.")
    e.add_argument("run", help="run folder (or, with --format diffusers / sd, a model folder)")
    e.add_argument("model_dir", help="model folder to write (--format sd: a .safetensors file)")
    e.add_argument("--no-ema", action="store_true",
                   help="export the trained weights instead of the EMA weights (default: EMA)")
    e.add_argument("--format", choices=("latentdiff", "diffusers", "sd"), default="latentdiff",
                   help="latentdiff model folder; a diffusers folder (StableDiffusionPipeline.from_pretrained reads "
                   "it); an SD single .safetensors in the CompVis key layout. diffusers and sd need a Stable "
                   "Diffusion-like model: latent, CLIP text encoder, no class labels")
    c = sub.add_parser("convert", help="convert a model between latentdiff, diffusers and SD single-file formats",
                       formatter_class=_fmt(),
                       description="Read a latentdiff run or model folder, a diffusers folder or an SD .safetensors / "
                       ".ckpt (read with torch.load(weights_only=True) only) and write it in another format, "
                       "printing what was mapped.")
    c.add_argument("src", help="latentdiff run/model folder, diffusers folder, or .safetensors / .ckpt file")
    c.add_argument("out", help="folder to write, or a .safetensors file for --format sd")
    c.add_argument("--format", choices=("latentdiff", "diffusers", "sd"), default=None,
                   help="output format (default: sd for a .safetensors OUT, else latentdiff from diffusers / sd "
                   "and diffusers from latentdiff)")
    c.add_argument("--tokenizer", default=None, help="single files: folder with the CLIP tokenizer's vocab.json and "
                   "merges.txt (default: a tokenizer/ folder beside the file)")
    c.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA weights")


def _add_reconstruct_parser(sub) -> None:
    r = sub.add_parser("reconstruct", help="an autoencoder's reconstructions beside the originals, as a PNG grid",
                       formatter_class=_fmt(),
                       description="Encode and decode held-out images with an autoencoder (run or model folder) and "
                       "write one grid with each original followed by its reconstruction; prints their PSNR and SSIM.")
    r.add_argument("model",
                   help="autoencoder run folder (its autoencoder/ export, else newest checkpoint) or model folder")
    r.add_argument("--data", default=None, help="a dataset name (shapes, digits, cifar10, ...) or an image folder "
                   "(default: the training data of the run, or the one a model folder records)")
    r.add_argument("--split", choices=["train", "test", "all"], default="test", help="split of a dataset")
    r.add_argument("--num", type=int, default=16, help="images to reconstruct")
    r.add_argument("--start", type=int, default=0, help="index of the first image")
    r.add_argument("--nrow", type=int, default=4, help="original/reconstruction pairs per grid row")
    r.add_argument("--sample", action="store_true",
                   help="KL models: decode a posterior sample (default: the posterior mean)")
    r.add_argument("--seed", type=int, default=0, help="seed of the posterior sample (with --sample)")
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    r.add_argument("--out", default="reconstructions.png", help="the PNG file to write")


def _add_eval_parser(sub) -> None:
    v = sub.add_parser("eval", help="score a model's samples (prompt adherence, FID, KID, IS, precision/recall) and "
                       "bits/dim, or compare two image folders",
                       formatter_class=_fmt(),
                       description="Sample a model and score the samples against real images with a feature network "
                       "(the FID Inception or an oracle classifier), each figure beside its floor: the same metric "
                       "between two disjoint parts of the real data; for a latent model with oracle features also "
                       "beside its first stage's ceiling (the floor with the real images replaced by the autoencoder's "
                       "reconstructions). A text model of the shapes world draws one image per held-out prompt "
                       "(test-split scenes of its own world) and is scored on prompt adherence (the shapes oracle "
                       "reads every object back) and on FID / precision / recall against the real images of those "
                       "prompts. Bits per dimension are the variational bound on real test images. Prints a table and "
                       "writes it as JSON into the model folder. With --real A --fake B, compares two image folders "
                       "instead.")
    v.add_argument("model", nargs="?", default=None,
                   help="run or model folder (default: none; then give --real and --fake)")
    v.add_argument("--metrics", default=None, help="comma-separated metrics: adherence (text models of the shapes "
                   "world: held-out prompts read back by the shapes oracle, per number of objects), fid, kid, is "
                   "(Inception Score), pr (precision/recall, the real set cut to the sample count), bpd (bits per "
                   "dimension of real test images; pixel-space models; T network calls per image); layout (layout "
                   "models: held-out layouts read back, adherence and box IoU), miou (segmentation models: per-class "
                   "IoU and mIoU of held-out maps read back, at each --size); for an autoencoder: psnr, ssim, rfid "
                   "(default: adherence,fid,kid,pr for a text model of the shapes world, layout or miou for those "
                   "models, else fid,kid,is,pr; for an autoencoder psnr,ssim,rfid)")
    v.add_argument("--num", type=int, default=1000, help="images to generate (for a text model of the shapes world: "
                   "held-out prompts, one image each; real test images for bpd; held-out images to reconstruct for "
                   "an autoencoder); FID falls with more, compare at equal N")
    v.add_argument("--reference", default=None, help="real images: a dataset name (digits, cifar10, ...), an image "
                   "folder, or a .npz statistics file written by an earlier eval; default: the model's training data "
                   "(its config.data), and for a text model of the shapes world the real images of its held-out "
                   "prompts")
    v.add_argument("--split", choices=["train", "test", "all"], default=None,
                   help="split of a dataset reference (default: the model config's data.split)")
    v.add_argument("--max-reference", type=int, default=None,
                   help="use at most this many reference images (default: all)")
    v.add_argument("--features", choices=["auto", "inception", "oracle"], default="auto",
                   help="feature network: inception (the standard FID network; needs its weights file), oracle (a "
                   "small classifier trained on the real data; built in for digits), or auto: the network a .npz "
                   "reference was made with, else the oracle for digits models or with --oracle, else inception")
    v.add_argument("--fid-weights", default=None, metavar="PATH", help="the FID Inception weights "
                   "pt_inception-2015-12-05-6726825d.pth (default: $LATENTDIFF_FID_WEIGHTS; never downloaded)")
    v.add_argument("--oracle", default=None, metavar="PATH", help="oracle folder written by `latentdiff oracle` "
                   "(default: the oracle of the model's dataset, digits or shapes, in the cache, trained on first "
                   "use)")
    v.add_argument("--cache", default=None, metavar="DIR", help="folder of cached reference statistics and oracles "
                   "(default: $LATENTDIFF_CACHE, else ~/.cache/latentdiff)")
    v.add_argument("--size", type=_sizes, default=None, metavar="HxW[,HxW...]",
                   help="layout, miou: image size(s) to sample at; miou gives one table row per size, from held-out "
                   "maps tiled to it (default: the training size)")
    v.add_argument("--real", default=None, metavar="A",
                   help="with --fake: the real images (folder, .npz statistics or dataset name; default: none)")
    v.add_argument("--fake", default=None, metavar="B",
                   help="with --real: the folder of generated images to score (default: none)")
    _add_eval_sampling_args(v)


def _add_eval_sampling_args(v) -> None:
    """The options of `latentdiff eval` on how the scored images are drawn and where the table goes."""
    v.add_argument("--sampler", default=None,
                   help="sampler name: ddpm, ddim, plms, dpmpp_2m, unipc, heun, ... (default: the config's)")
    v.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    v.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the config's)")
    v.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the config's)")
    v.add_argument("--seed", type=int, default=None, help="image i uses seed + i and, for class-conditional models, "
                   "class i mod K; text models of the shapes world: the held-out prompts are test scenes of world "
                   "seed S, the floor's of S + 1 (default: the config's)")
    v.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: the config's sample.batch_size; 64 for folders)")
    v.add_argument("--no-ema", action="store_true",
                   help="use the trained weights instead of the EMA weights (run folders; default: EMA)")
    v.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps ... (default: cuda if available, else mps, else cpu)")
    v.add_argument("--out", default=None, help="JSON file to write (default: "
                   "MODEL/eval/eval_<sampler>_<steps>_g<guidance>_<features>.json; with --real/--fake none)")
    v.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")


def _add_oracle_parser(sub) -> None:
    o = sub.add_parser("oracle", help="train an oracle classifier on an embedded dataset (its features score "
                       "samples)", formatter_class=_fmt(),
                       description="Train the small classifier whose features and logits `latentdiff eval --features "
                       "oracle` uses, save it as a folder (config.json + model.safetensors) and print its accuracy on "
                       "held-out real images.")
    o.add_argument("dataset", choices=["digits", "shapes"], help="the dataset to learn: digits (scikit-learn's 8x8 "
                   "digits) or shapes (the procedural shapes world: reads back shape, colour and 3x3 position of "
                   "every object)")
    o.add_argument("--out", default=None,
                   help="folder to write (default: CACHE/oracles/digits, where eval looks for it)")
    o.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $LATENTDIFF_CACHE, else ~/.cache/latentdiff)")
    o.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30 for digits, over its 80%% "
                   "training part; 5 for shapes, over 20,000 images)")
    o.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the batches (default: 0)")


def _add_serve_parser(sub) -> None:
    v = sub.add_parser("serve", help="a web page and an HTTP API for one or several models", formatter_class=_fmt(),
                       description="Serve models on a web page (prompt, class, conditions, image to image, inpainting "
                       "mask, live preview, gallery) and an HTTP API (docs/serve.md). Binds to 127.0.0.1; another "
                       "address needs --token, which every API call must then carry.")
    v.add_argument("models", nargs="+", metavar="MODEL",
                   help="run or model folders (each served under its folder name)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind; other than localhost needs --token")
    v.add_argument("--port", type=int, default=7860, help="port to bind (0: any free port)")
    v.add_argument("--token", default=None, help="a secret every API call must carry (Authorization: Bearer T, "
                   "X-Token: T or ?token=T); default: none, allowed on localhost only")
    v.add_argument("--max-queue", type=int, default=16, help="jobs queued or running; past it a request gets 429")
    v.add_argument("--max-steps", type=int, default=200, help="sampling steps per image")
    v.add_argument("--max-images", type=int, default=16, help="images per request, and per batch of merged requests")
    v.add_argument("--max-size", type=int, default=1024, help="pixels per side of a generated image")
    v.add_argument("--max-upload-mb", type=float, default=8.0, help="megabytes per uploaded file")
    v.add_argument("--out", default="outputs/serve", help="folder the generated PNGs are written to")
    v.add_argument("--grace", type=float, default=10.0,
                   help="seconds running jobs get to finish at shutdown (SIGTERM) before they are cancelled")
    v.add_argument("--device", default=None, help="cpu, cuda, mps ... (default: cuda if available, else cpu)")
    v.add_argument("--quiet", action="store_true", help="no request log (default: one line per request)")


def _sizes(text: str) -> list[tuple[int, int]]:
    """"32x32,64x128" -> [(32, 32), (64, 128)]."""
    return [_size(part) for part in text.split(",") if part.strip()]


def _size(text: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(v) for v in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels (e.g. 64x96), got {text!r}")
    return size
