"""A folder of images, with captions and labels, as a map-style dataset.

Captions and labels come from ``metadata.jsonl`` files in the Hugging Face ``imagefolder`` convention (one
JSON object per line: ``{"file_name": "a/b.png", "text": "...", "label": 3}``, ``file_name`` relative to the
folder that holds the metadata file; ``caption`` is accepted for ``text``), from sidecar ``.txt`` files with
the image's stem (``cat.png`` + ``cat.txt``), or, for labels, from first-level subfolder names.

Everything that can go wrong with the files is found when the dataset is built, before any training step:
each image is opened and checked once with PIL's ``verify`` (reads headers and checksums, does not decode
pixels), unreadable ones are skipped and counted in one logged warning, and a missing or empty folder, an
unconvertible image mode, or a metadata line without a required field raises a clear error. An image over
PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``, a decompression bomb) counts as unreadable. A metadata line
whose ``file_name`` points outside the folder (an absolute path, ``..``, a symlink out) is refused. A file that
passes ``verify`` but fails to decode later (a truncated JPEG) is replaced by the next good image with a
warning instead of stopping the run, and counted in ``num_failed``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ..errors import DataError, MissingFileError
from .transforms import (
    _size_hw,
    check_channels,
    convert_channels,
    convertible,
    crop_box,
    item_generator,
    random_flip,
    resize_to_cover,
    to_tensor,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_NAME = "metadata.jsonl"
CAPTION_FIELDS = ("text", "caption")  # the first present one is the caption
CAPTION_SOURCES = ("auto", "metadata", "txt", "none")
LABEL_SOURCES = ("auto", "metadata", "folder", "none")


class ImageFolder(Dataset):
    """Images under ``root`` (recursively), resized and cropped to ``size``, as (C, H, W) float32 in [-1, 1].

    Args:
        root: the folder; images are found recursively (png, jpg, jpeg, webp; hidden paths ignored).
        size: output size, an int (square) or (height, width). The image is resized so it just covers the
            size (shorter side for squares), then cropped.
        channels: 1 (greyscale), 3 (RGB) or 4 (RGBA). Transparent images become 1 or 3 channels over white.
        crop: ``center`` or ``random`` (a random window of the resized image).
        flip: random horizontal flip with probability 1/2.
        captions: ``metadata`` (text/caption of metadata.jsonl), ``txt`` (sidecar files), ``none``, or
            ``auto``: metadata if a metadata line has a caption, else txt if any sidecar exists, else none.
        labels: ``metadata`` (its ``label``: ints, or strings mapped to sorted class names), ``folder``
            (first-level subfolder names, sorted), ``none``, or ``auto``: metadata if a line has a label, else
            folder if every image sits in one of two or more first-level subfolders, else none.
        seed: seed of the random crop and flip; item i of epoch e draws from a generator seeded by
            (seed, e, i) (see :meth:`set_epoch`), or from the generator handed to :meth:`get`.

    Items: ``{"image", "path", "index"}`` plus ``"caption"`` (str) and ``"label"`` (int) when the dataset has
    them. Attributes: ``classes`` (names or None), ``num_classes``, ``has_captions``, ``num_skipped``.
    """

    def __init__(
        self,
        root,
        size,
        *,
        channels: int = 3,
        crop: str = "center",
        flip: bool = False,
        captions: str = "auto",
        labels: str = "auto",
        seed: int = 0,
    ):
        self.root = Path(os.path.normpath(Path(root).expanduser()))
        self.size = _size_hw(size)
        self.channels = check_channels(channels)
        if crop not in ("center", "random"):
            raise ValueError(f"unknown crop {crop!r}; expected 'center' or 'random'")
        if captions not in CAPTION_SOURCES:
            raise ValueError(f"unknown captions source {captions!r}; expected one of {', '.join(CAPTION_SOURCES)}")
        if labels not in LABEL_SOURCES:
            raise ValueError(f"unknown labels source {labels!r}; expected one of {', '.join(LABEL_SOURCES)}")
        self.crop, self.flip, self.seed, self.epoch = crop, bool(flip), int(seed), 0

        if not self.root.exists():
            raise MissingFileError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{str(self.root)!r} is not a folder")
        found = self._scan()
        if not found:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}")
        paths, bad = self._verify(found)
        self.num_skipped = len(bad)
        if bad:
            shown = "; ".join(f"{p.relative_to(self.root)} ({e})" for p, e in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            logger.warning("skipped %d unreadable image(s) under %s: %s%s", len(bad), self.root, shown, more)
        if not paths:
            raise DataError(f"none of the {len(found)} image(s) under {str(self.root)!r} could be read")

        records = self._read_metadata(set(found))
        self.caption_source = self._resolve_captions(captions, records, paths)
        self.label_source = self._resolve_labels(labels, records, paths)
        caps = self._captions(paths, records) if self.caption_source != "none" else None
        raw_labels = self._raw_labels(paths, records) if self.label_source != "none" else None
        self.classes, label_ids = _label_ids(raw_labels) if raw_labels is not None else (None, None)
        self.num_classes = len(self.classes) if self.classes is not None else None
        self.has_captions = caps is not None
        self.paths = paths
        self.captions = caps
        self.labels = label_ids
        self._failed: set[int] = set()

    # ---- construction helpers -------------------------------------------------------------------------

    def _scan(self) -> list[Path]:
        out = []
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                out.append(p)
        return sorted(out)

    def _verify(self, found: list[Path]):
        good, bad, modes_ok = [], [], {}
        for p in found:
            try:
                mode = _check_image(p)
            except Exception as e:  # any failure to parse an untrusted file means "unreadable"
                bad.append((p, f"{type(e).__name__}: {e}"))
                continue
            if mode not in modes_ok:
                modes_ok[mode] = convertible(mode, self.channels)
            if not modes_ok[mode]:
                raise DataError(
                    f"{p}: image mode {mode!r} cannot be converted to {self.channels} channel(s); "
                    "convert it to RGB, RGBA or greyscale first"
                )
            good.append(p)
        return good, bad

    def _read_metadata(self, existing: set[Path]) -> dict[Path, tuple[str, int, dict]]:
        """Image path -> (metadata file, line number, record) from every metadata.jsonl under root."""
        records: dict[Path, tuple[str, int, dict]] = {}
        for meta in sorted(self.root.rglob(METADATA_NAME)):
            if any(part.startswith(".") for part in meta.relative_to(self.root).parts):
                continue
            with open(meta, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{meta}:{lineno}"
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                    if "file_name" not in rec:
                        raise DataError(f"{where}: missing required field 'file_name'")
                    name = rec["file_name"]
                    if not isinstance(name, str) or not name:
                        raise DataError(f"{where}: field 'file_name' must be a non-empty string, got {name!r}")
                    key = Path(os.path.normpath(meta.parent / name))  # lexical, like the scanned paths
                    if Path(name).is_absolute() or not _inside(self.root, meta.parent / name):
                        raise DataError(f"{where}: file_name {name!r} points outside the dataset folder "
                                        f"{str(self.root)!r} (an absolute path, '..' or a symlink out); "
                                        "metadata may only name files inside it")
                    if key not in existing:
                        if not key.is_file():
                            raise DataError(f"{where}: file_name {name!r} does not exist under {str(meta.parent)!r}")
                        raise DataError(
                            f"{where}: file_name {name!r} is not an image this dataset reads "
                            f"({', '.join(IMAGE_EXTENSIONS)})"
                        )
                    if key in records:
                        first = records[key]
                        raise DataError(f"{where}: {name!r} is already described at {first[0]}:{first[1]}")
                    records[key] = (str(meta), lineno, rec)
        return records

    def _resolve_captions(self, source, records, paths) -> str:
        if source == "auto":
            if any(_caption_field(r) for _, _, r in records.values()):
                return "metadata"
            if any(p.with_suffix(".txt").is_file() for p in paths):
                return "txt"
            return "none"
        if source == "metadata" and not records:
            raise DataError(f"captions='metadata' but there is no {METADATA_NAME} under {str(self.root)!r}")
        return source

    def _resolve_labels(self, source, records, paths) -> str:
        if source == "auto":
            if any("label" in r for _, _, r in records.values()):
                return "metadata"
            rels = [p.relative_to(self.root).parts for p in paths]
            if all(len(r) > 1 for r in rels) and len({r[0] for r in rels}) >= 2:
                return "folder"
            return "none"
        if source == "metadata" and not records:
            raise DataError(f"labels='metadata' but there is no {METADATA_NAME} under {str(self.root)!r}")
        return source

    def _record(self, p: Path, records, need: str):
        rec = records.get(p)
        if rec is None:
            raise DataError(f"{p}: no line in {METADATA_NAME} describes this image (needed for its {need})")
        return rec

    def _captions(self, paths, records) -> list[str]:
        caps = []
        for p in paths:
            if self.caption_source == "metadata":
                meta, lineno, rec = self._record(p, records, "caption")
                field = _caption_field(rec)
                if field is None:
                    raise DataError(f"{meta}:{lineno}: missing required field 'text' (or 'caption')")
                if not isinstance(rec[field], str):
                    raise DataError(f"{meta}:{lineno}: field {field!r} must be a string, got {rec[field]!r}")
                caps.append(rec[field])
            else:  # txt
                txt = p.with_suffix(".txt")
                if not txt.is_file():
                    raise MissingFileError(f"{p}: caption file {txt.name!r} is missing (captions='txt')")
                caps.append(txt.read_text(encoding="utf-8").strip())
        return caps

    def _raw_labels(self, paths, records) -> list[tuple[str, object]]:
        out = []
        for p in paths:
            if self.label_source == "metadata":
                meta, lineno, rec = self._record(p, records, "label")
                if "label" not in rec:
                    raise DataError(f"{meta}:{lineno}: missing required field 'label'")
                out.append((f"{meta}:{lineno}", rec["label"]))
            else:  # folder
                parts = p.relative_to(self.root).parts
                if len(parts) < 2:
                    raise DataError(f"{p}: labels='folder' needs every image in a subfolder named by its class")
                out.append((str(p), parts[0]))
        return out

    # ---- items ----------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and flips ``__getitem__`` draws (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_failed(self) -> int:
        """Images of this process that passed the check at construction but failed to decode when loaded (each
        replaced by the next image, with a warning naming it)."""
        return len(self._failed)

    def __getitem__(self, index):
        """Item ``index`` of the current epoch; ``(index, epoch)`` selects the epoch explicitly."""
        epoch = self.epoch
        if isinstance(index, tuple):
            index, epoch = index
        return self.get(index, epoch=epoch)

    def get(self, index: int, *, generator: torch.Generator | None = None, epoch: int | None = None) -> dict:
        """Item ``index``; random transforms draw from ``generator`` or, if None, from (seed, epoch, index)."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        if generator is None and (self.crop == "random" or self.flip):
            generator = item_generator(self.seed, self.epoch if epoch is None else epoch, index)
        src = index
        for _ in range(n):
            try:
                image = self._load(self.paths[src], generator)
                break
            except Exception as e:  # decoding failed despite verify (e.g. a truncated JPEG): use the next image
                if src not in self._failed:
                    self._failed.add(src)
                    logger.warning("could not decode %s (%s: %s); using the next image", self.paths[src],
                                   type(e).__name__, e)
                src = (src + 1) % n
        else:
            raise DataError(f"no image under {str(self.root)!r} could be decoded")
        item = {"image": image, "path": str(self.paths[src]), "index": index}
        if self.captions is not None:
            item["caption"] = self.captions[src]
        if self.labels is not None:
            item["label"] = self.labels[src]
        return item

    def _load(self, path: Path, generator: torch.Generator | None) -> torch.Tensor:
        h, w = self.size
        with Image.open(path) as im:
            im.draft(None, (max(h, w), max(h, w)))  # JPEG: decode at a reduced scale still >= the target
            im.load()
            img = ImageOps.exif_transpose(im)
        img = convert_channels(img, self.channels)
        img = resize_to_cover(img, self.size)
        img = img.crop(crop_box(img.size, self.size, self.crop, generator))
        x = to_tensor(img)  # (C, H, W) in [-1, 1]
        if self.flip:
            x = random_flip(x, generator)
        return x

    def __repr__(self) -> str:
        extra = f", classes={self.num_classes}" if self.classes is not None else ""
        cap = f", captions={self.caption_source}" if self.has_captions else ""
        return f"ImageFolder({str(self.root)!r}, n={len(self)}, size={self.size}, channels={self.channels}{extra}{cap})"


def _check_image(path: Path) -> str:
    """The mode of the image file ``path`` after PIL's ``verify`` (headers; PNG: every chunk's checksum) and
    its pixel limit: a decompression bomb is refused from 1x Image.MAX_IMAGE_PIXELS on, where PIL itself only
    warns up to 2x. Pixels are not decoded: a truncated JPEG is found when it is first loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
    return mode


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside ``root`` (also resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _caption_field(rec: dict) -> str | None:
    return next((k for k in CAPTION_FIELDS if k in rec), None)


def _label_ids(raw: list[tuple[str, object]]) -> tuple[list[str], list[int]]:
    """Labels as ints 0..K-1 and class names: ints are kept (K = max + 1), strings map to sorted names."""
    kinds = set()
    for where, v in raw:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DataError(f"{where}: field 'label' must be an int or a string, got {v!r}")
        if isinstance(v, int) and v < 0:
            raise DataError(f"{where}: field 'label' must be >= 0, got {v}")
        kinds.add(type(v))
    if len(kinds) > 1:
        where = next(w for w, v in raw if isinstance(v, str))
        raise DataError(f"{where}: labels mix ints and strings; use one kind for every image")
    values = [v for _, v in raw]
    if kinds == {int}:
        return [str(i) for i in range(max(values) + 1)], list(values)
    classes = sorted(set(values))
    ids = {c: i for i, c in enumerate(classes)}
    return classes, [ids[v] for v in values]


def first_image_side(root: Path) -> int | None:
    """The shorter side of the first readable image under ``root`` (sorted paths), or None."""
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."):
            try:
                with Image.open(p) as im:
                    return min(im.size)
            except Exception:  # unreadable: ImageFolder skips it and reports it
                continue
    return None


def folder_dataset(path, *, size: int | None = None, channels: int = 3) -> ImageFolder:
    """An ImageFolder of ``path`` as plain images (no labels, captions or random transforms) at ``size``
    (default: the shorter side of its first readable image): a set of real or generated images to score."""
    root = Path(path)
    if root.is_dir() and size is None:
        size = first_image_side(root)
    return ImageFolder(root, size or 8, channels=channels, captions="none", labels="none")
