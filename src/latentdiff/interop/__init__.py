"""Stable Diffusion and diffusers checkpoints in and out (DESIGN.md: the layer above pipeline).

    import latentdiff
    pipe = latentdiff.load("stable-diffusion-v1-5/")          # a diffusers folder
    pipe = latentdiff.load("v1-5-pruned-emaonly.safetensors", tokenizer="sd15/tokenizer")   # an SD single file
    images = pipe.sample(prompts=["a photograph of an astronaut riding a horse"], seed=0)
    latentdiff.interop.convert("runs/sd-finetune", "out/diffusers", format="diffusers")

:func:`load` is the one road from a path to a Pipeline: it detects the format (:func:`detect_format`) and
falls back to :meth:`Pipeline.load` for latentdiff run and model folders. :func:`save` writes any of the three
formats; :func:`convert` is load + save with a summary. img2img and inpainting in diffusers' conventions are in
:mod:`latentdiff.interop.editing`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, MissingFileError

FORMATS = ("latentdiff", "diffusers", "sd")

__all__ = ["FORMATS", "check_text_to_image", "convert", "detect_format", "load", "save"]


def detect_format(path) -> str:
    """"diffusers" (a folder with model_index.json or unet/), "sd" (a .safetensors / .ckpt file) or "latentdiff"
    (any other folder: a run or model folder); MissingFileError when nothing is there."""
    from .diffusers_folder import is_diffusers_folder

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
            return "sd"
        raise CheckpointError(f"{path}: a file that is not a checkpoint (.safetensors or .ckpt); a latentdiff model "
                              "is a folder")
    if is_diffusers_folder(path):
        return "diffusers"
    if (path / "model_index.json").exists() or any((path / p).is_dir() for p in ("vae", "text_encoder", "scheduler")):
        if not (path / "config.yaml").is_file():
            raise MissingFileError(f"{path} looks like a diffusers folder but has no unet/ (unet/config.json)")
    return "latentdiff"


def load(path, *, ema: bool = True, device=None, tokenizer=None, prediction: str | None = None):
    """A :class:`~latentdiff.pipeline.Pipeline` from a latentdiff run or model folder, a diffusers folder or an SD
    single file. ``ema``: EMA weights where the source has them; ``tokenizer``, ``prediction``: for single files
    (see :mod:`.single_file`)."""
    from ..pipeline import Pipeline

    fmt = detect_format(path)
    if fmt == "diffusers":
        from .diffusers_folder import load_diffusers

        pipe = load_diffusers(path)
    elif fmt == "sd":
        from .single_file import load_single_file

        pipe = load_single_file(path, tokenizer=tokenizer, prediction=prediction, ema=ema)
    elif _is_clip_model_folder(Path(path)):
        pipe = _load_clip_model_folder(Path(path), ema=ema)
    else:
        return Pipeline.load(path, ema=ema, device=device)
    if device is not None:
        pipe.to(device)
    return pipe.eval()


def check_text_to_image(pipe) -> None:
    """RequestError for an imported inpainting model (9-channel U-Net) asked for plain text-to-image sampling:
    it needs an image and a mask (:func:`latentdiff.interop.editing.generate`)."""
    from ..errors import RequestError
    from .clip import ClipConditioner

    if isinstance(pipe.conditioner, ClipConditioner) and pipe.unet.config.concat_channels:
        raise RequestError("this is a Stable Diffusion inpainting model (9-channel U-Net): it needs an image and a "
                           "mask; use latentdiff.interop.editing.generate(pipe, prompts, image=..., mask=...)")


def _is_clip_model_folder(path: Path) -> bool:
    from ..folders import CONFIG_FILE

    if not (path / CONFIG_FILE).is_file():
        return False
    from ..config import read_yaml

    cond = read_yaml(path / CONFIG_FILE).get("conditioning") or {}
    return isinstance(cond, dict) and cond.get("kind") == "clip"


def _load_clip_model_folder(path: Path, ema: bool):
    """A latentdiff model folder of an imported Stable Diffusion model: config.yaml, model.safetensors,
    first_stage/, text_encoder/ and tokenizer/."""
    from ..config import load_config
    from ..folders import CONFIG_FILE, load_model_weights, model_weights
    from ..pipeline import Pipeline
    from .clip import load_conditioner

    config = load_config(path / CONFIG_FILE)
    pipe = Pipeline.from_config(config, base_dir=path, conditioner=load_conditioner(path))
    load_model_weights(pipe.unet, model_weights(path, "unet", ema=ema))
    return pipe


def save(pipe, out, format: str = "latentdiff") -> Path:  # noqa: A002  (the command's --format)
    """Write ``pipe`` as a latentdiff model folder, a diffusers folder or an SD single file (.safetensors)."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if format == "diffusers":
        from .diffusers_folder import save_diffusers

        return save_diffusers(pipe, out)
    if format == "sd":
        from .single_file import save_single_file

        return save_single_file(pipe, out)
    return pipe.save(out)


def convert(src, out, format: str | None = None, **load_options) -> dict:  # noqa: A002
    """Load ``src`` (any format) and write it to ``out`` in ``format`` (None: "sd" for a .safetensors ``out``, else
    "diffusers" from a latentdiff source and "latentdiff" from the others). Returns a summary of what was mapped."""
    src_format = detect_format(src)
    if format is None:
        if str(out).endswith(".safetensors"):
            format = "sd"
        else:
            format = "diffusers" if src_format == "latentdiff" else "latentdiff"
    if Path(out).exists() and Path(out).resolve() == Path(src).resolve():
        raise CheckpointError(f"{out}: the output is the input; write to another path")
    pipe = load(src, **load_options)
    save(pipe, out, format)
    count = lambda m: 0 if m is None else len(m.state_dict())  # noqa: E731
    return {"from": src_format, "to": format, "out": str(out), "unet_tensors": count(pipe.unet),
            "autoencoder_tensors": count(pipe.autoencoder), "text_encoder_tensors": count(pipe.conditioner),
            "prediction": pipe.diffusion.prediction, "sampler": pipe.config.sample.sampler,
            "inpainting": pipe.unet.config.concat_channels == 5}
