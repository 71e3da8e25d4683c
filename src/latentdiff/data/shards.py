"""Sharded, streamed image-text data in the webdataset tar format, split over processes and workers.

A shard is a plain tar file. Each sample is a run of consecutive members sharing a key, the member's path up
to the first dot of its file name: ``0001.png`` + ``0001.txt`` (+ ``0001.json``, ``0001.cls``) is one sample
with key ``0001``; latent shards (``latentdiff encode``) hold ``0001.mean.npy`` + ``0001.std.npy`` + ``0001.txt``.
This is the webdataset convention, so shards written here are read by the ``webdataset`` package and the reverse.

Shards are named by a spec: a path, a folder (its ``*.tar``), a glob (``data/*.tar``), a brace range
(``data/shard-{000000..000099}.tar``), a ``pipe:`` command whose standard output is the tar stream
(``pipe:curl -s http://host/shard-000001.tar``, ``pipe:cat x.tar``), or a list of these.

Why an own reader instead of the ``webdataset`` package: the training loop must name the position of the
stream in a checkpoint and continue from it exactly, with the shards split over ranks and loader workers so that
no sample is read twice in an epoch. That needs the shard order, the worker split and the shuffle buffer's RNG to
be functions of (seed, epoch, worker) that this code owns; the tar reading itself is the standard library's
``tarfile`` in streaming mode (it reads pipes), about 40 lines here. The package stays a test oracle for the format.

Order of one epoch e (for global worker g of N = processes × loader workers):

1. shard order: a permutation of the shards drawn from (seed, e); worker g reads shards order[g::N];
2. its samples go through a shuffle buffer of ``shuffle_buffer`` samples drawn from (seed, e, g): fill the buffer,
   then emit a random slot and refill it with the next sample; at the end, emit the rest in a random order;
3. samples are decoded after the buffer (so a resume skips samples without decoding them) and grouped into
   batches by the worker.

The position of worker g is (epoch, samples emitted in that epoch); each batch carries it, the training loop keeps
the newest one of every worker and saves them in its checkpoints. A resumed worker replays its epoch's order
without decoding up to that count, so it continues with exactly the next sample.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..errors import ConfigError, DataError, MissingFileError
from ..fileio import read_json
from .transforms import check_channels, convert_channels, crop_box, resize_to_cover, to_tensor

INDEX_FILE = "index.json"                               # written by write_shards: shard names and sample counts
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
POSITION_KEY = "_stream"                                # batch field: [global worker, epoch, samples emitted]

# ---------------------------------------------------------------------------------------------------------
# Naming shards


def _expand_braces(spec: str) -> list[str]:
    """``a{000..002}b`` -> ``a000b a001b a002b`` (zero padding kept); several ranges multiply."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m is None:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    if hi < lo:
        raise ConfigError(f"shard spec {spec!r}: the range {m.group(0)} is empty")
    return [s for i in range(lo, hi + 1)
            for s in _expand_braces(spec[: m.start()] + str(i).zfill(width) + spec[m.end():])]


def expand_urls(spec) -> list[str]:
    """The shard URLs a spec names (see the module docstring); local files must exist."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s)]
    spec = str(spec)
    if spec.startswith("pipe:"):
        return _expand_braces(spec)  # pipe:cat shard-{000..009}.tar names 10 commands
    urls = []
    for s in _expand_braces(os.path.expanduser(spec)):
        if os.path.isdir(s):
            found = sorted(glob.glob(os.path.join(s, "*.tar")))
            if not found:
                raise DataError(f"shard folder {s!r} holds no .tar files")
            urls += found
        elif glob.has_magic(s):
            found = sorted(glob.glob(s))
            if not found:
                raise MissingFileError(f"no shard matches {s!r}")
            urls += found
        elif os.path.isfile(s):
            urls.append(s)
        else:
            raise MissingFileError(f"shard {s!r} not found")
    return urls


# ---------------------------------------------------------------------------------------------------------
# Reading one shard


class _Source:
    """A context manager: the byte stream of one URL (a file, or a ``pipe:`` command's stdout)."""

    def __init__(self, url: str):
        self.url, self.proc, self.file = url, None, None

    def __enter__(self):
        if self.url.startswith("pipe:"):
            self.proc = subprocess.Popen(self.url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            return self.proc.stdout
        self.file = open(self.url, "rb")
        return self.file

    def __exit__(self, exc_type, *_):
        if self.file is not None:
            self.file.close()
        if self.proc is not None:
            self.proc.stdout.close()
            err = self.proc.stderr.read().decode(errors="replace").strip()
            code = self.proc.wait()
            if code != 0 and exc_type is not GeneratorExit:  # (a reader that stops early closes the pipe)
                raise DataError(f"shard command {self.url!r} failed with exit status {code}: {err[-300:]}")
        return False


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member path: ``a/b/0001.mean.npy`` -> (``a/b/0001``, ``mean.npy``)."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of the shard ``url``, in tar order."""
    key, parts = None, {}
    try:
        with _Source(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if k != key and parts:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataError(f"shard {url!r} is not a readable tar file: {e}") from None
    if parts:
        yield key, parts


# ---------------------------------------------------------------------------------------------------------
# Decoding a sample


def _image(data: bytes, size, channels: int, where: str) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(io.BytesIO(data)) as im:
            if size is not None:
                im.draft(None, (max(size), max(size)))  # JPEG: decode at a reduced scale still >= the target
            im.load()
            img = ImageOps.exif_transpose(im)
    except OSError as e:
        raise DataError(f"{where}: the image cannot be decoded ({e})") from None
    img = convert_channels(img, channels)
    if size is not None:
        img = resize_to_cover(img, size)
        img = img.crop(crop_box(img.size, size, "center"))
    return to_tensor(img)


def _npy(data: bytes, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    except (ValueError, OSError) as e:
        raise DataError(f"{where}: not a numeric .npy array ({e})") from None


def decode_sample(key: str, parts: dict[str, bytes], *, size=None, channels: int = 3, url: str = "?") -> dict:
    """One sample as the item dict of latentdiff's datasets: ``image`` (C, H, W) in [-1, 1] or ``latent_mean``
    (+ ``latent_std``), ``caption`` (txt, or json text/caption), ``label`` (cls, or json label) and ``key``."""
    where = f"shard {url!r}, sample {key!r}"
    item: dict = {"key": key, **text_fields(parts)}
    for ext, data in parts.items():
        if ext in IMAGE_EXTS:
            item["image"] = _image(data, size, channels, where)
        elif ext in ("mean.npy", "std.npy"):
            item[f"latent_{ext[:-4]}"] = _npy(data, where)
    if "image" not in item and "latent_mean" not in item:
        raise DataError(f"{where} has no image ({', '.join(IMAGE_EXTS)}) and no mean.npy; members: "
                        f"{', '.join(sorted(parts))}")
    return item


def text_fields(parts: dict[str, bytes]) -> dict:
    """``caption`` (txt, or json text/caption) and ``label`` (cls, or json label) of a sample's members."""
    item: dict = {}
    for ext, data in parts.items():
        if ext == "txt":
            item["caption"] = data.decode("utf-8").strip()
        elif ext == "cls":
            item["label"] = int(data.decode().strip())
        elif ext == "json":
            meta = json.loads(data.decode("utf-8"))
            for name in ("text", "caption"):
                if isinstance(meta.get(name), str):
                    item.setdefault("caption", meta[name])
            if "label" in meta:
                item.setdefault("label", int(meta["label"]))
    return item


# ---------------------------------------------------------------------------------------------------------
# The stream


def shuffled(samples: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffling: keep ``buffer`` samples, emit a random one and put the next sample in its slot."""
    if buffer <= 1:
        yield from samples
        return
    slots = []
    for s in samples:
        if len(slots) < buffer:
            slots.append(s)
            continue
        i = int(rng.integers(buffer))
        slots[i], s = s, slots[i]
        yield s
    for i in rng.permutation(len(slots)):
        yield slots[i]


class ShardStream(IterableDataset):
    """Endless batches from webdataset shards (see the module docstring for the order and the position).

    Args:
        spec: the shards (path, folder, glob, brace range, ``pipe:`` command, or a list).
        size: images are resized to cover and centre-cropped to this (int or (H, W)); None keeps their size.
        channels: 1, 3 or 4 image channels.
        shuffle_buffer: samples in the shuffle buffer; 0 or 1 = the shards' order.
        shuffle_shards: permute the shard order every epoch.
        seed: seeds the shard order and the buffer (with the epoch and the worker).

    The training loop calls :meth:`configured` with its micro-batch, process count and rank; iterating yields
    collated batches with a ``_stream`` field [global worker, epoch, samples emitted].
    """

    def __init__(self, spec, *, size=None, channels: int = 3, shuffle_buffer: int = 1000, shuffle_shards: bool = True,
                 seed: int = 0):
        self.spec, self.urls = spec, expand_urls(spec)
        self.size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        self.channels = check_channels(channels)
        self.shuffle_buffer, self.shuffle_shards, self.seed = int(shuffle_buffer), bool(shuffle_shards), int(seed)
        self.batch_size, self.world_size, self.rank = 1, 1, 0
        self.latent_std = True                         # latent shards: keep σ (False: train on the posterior mean)
        self.start: dict[int, tuple[int, int]] = {}    # global worker -> (epoch, samples emitted) to resume from
        self.rotation = 0                              # loader worker w plays logical worker (w + rotation) % W

    def configured(self, *, batch_size: int, world_size: int = 1, rank: int = 0) -> ShardStream:
        if len(self.urls) < world_size:
            raise ConfigError(f"{len(self.urls)} shard(s) for {world_size} processes: every process needs at least "
                              "one shard (write smaller shards: latentdiff shard --shard-size)")
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), int(rank)
        return self

    @property
    def num_samples(self) -> int | None:
        """Samples in all shards, from the ``index.json`` beside them (written by ``latentdiff shard``), if any."""
        return shard_index_total(self.urls)

    def preview(self, n: int) -> list[dict]:
        """The first ``n`` samples in the shards' stored order, decoded (for checks and a tokenizer's vocabulary)."""
        out = []
        for url in self.urls:
            for key, parts in iter_samples(url):
                if len(out) == n:
                    return out
                out.append(decode_sample(key, parts, size=self.size, channels=self.channels, url=url))
        return out

    def captions(self, n: int) -> list[str]:
        """The captions of the first ``n`` samples in stored order, read without decoding an image."""
        out = []
        for url in self.urls:
            for key, parts in iter_samples(url):
                if len(out) == n:
                    return out
                caption = text_fields(parts).get("caption")
                if caption is None:
                    raise DataError(f"shard {url!r}, sample {key!r} has no caption (.txt, or text in .json)")
                out.append(caption)
        return out

    def worker_ids(self, num_workers: int) -> range:
        """The global worker ids of this process."""
        w = max(num_workers, 1)
        return range(self.rank * w, (self.rank + 1) * w)

    def epoch_samples(self, epoch: int, g: int, n: int) -> Iterator[tuple[str, str, dict]]:
        """(url, key, parts) of global worker g of n in epoch ``epoch``, in emission order (undecoded)."""
        order = np.arange(len(self.urls))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        mine = [self.urls[i] for i in order[g::n]]
        raw = ((u, k, p) for u in mine for k, p in iter_samples(u))
        return shuffled(raw, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, g]))

    def batches(self, g: int, n: int) -> Iterator[dict]:
        """Endless batches of global worker g of n, from its saved start position."""
        epoch, skip = self.start.get(g, (0, 0))
        batch = []
        while True:
            count = 0
            for url, key, parts in self.epoch_samples(epoch, g, n):
                count += 1
                if count <= skip:
                    continue  # already emitted before the resume: skipped undecoded
                item = decode_sample(key, parts, size=self.size, channels=self.channels, url=url)
                if not self.latent_std:
                    item.pop("latent_std", None)
                batch.append(item)
                if len(batch) == self.batch_size:
                    out = default_collate(batch)
                    out[POSITION_KEY] = [g, epoch, count]
                    yield out
                    batch = []
            if count == 0:
                raise DataError(f"worker {g} of {n} read no sample in epoch {epoch} from its shards of "
                                f"{self.spec!r} (empty shards?)")
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        w, num = (0, 1) if info is None else (info.id, info.num_workers)
        n = self.world_size * num
        if len(self.urls) < n:
            raise ConfigError(f"{len(self.urls)} shard(s) for {self.world_size} process(es) × {num} loader worker(s): "
                              "every worker needs at least one shard (fewer train.num_workers, or smaller shards)")
        return self.batches(self.rank * num + (w + self.rotation) % num, n)

    def __repr__(self) -> str:
        return f"ShardStream({len(self.urls)} shards, size={self.size}, buffer={self.shuffle_buffer})"


def shard_index_total(urls: list[str]) -> int | None:
    """The sample count of ``urls`` from the index.json files beside them; None if any shard is not listed."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(u) for u in urls if not u.startswith("pipe:")}:
        path = Path(folder) / INDEX_FILE
        if path.is_file():
            for s in read_json(path, DataError).get("shards", []):
                counts[os.path.join(folder, s["name"])] = int(s["count"])
    try:
        return sum(counts[u] for u in urls)
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Writing shards


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same samples give the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[tuple[str, dict[str, bytes]]], out, *, shard_size: int = 1000,
                 prefix: str = "shard") -> list[Path]:
    """Write (key, {extension: bytes}) samples into ``out/{prefix}-000000.tar``, ... (``shard_size`` samples each)
    and ``out/index.json``; each shard is written under a temporary name and renamed when complete."""
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, counts, tar, tmp, n = [], [], None, None, 0

    def close():
        tar.close()
        final = out / f"{prefix}-{len(written):06d}.tar"
        os.replace(tmp, final)
        written.append(final)
        counts.append(n)

    for key, parts in samples:
        if tar is None:
            tmp = out / f".{prefix}-{len(written):06d}.tar.tmp"
            tar, n = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 0
        for ext, data in parts.items():
            _add_member(tar, f"{key}.{ext}", data)
        n += 1
        if n == shard_size:
            close()
            tar = None
    if tar is not None:
        close()
    index = {"format": "webdataset", "shards": [{"name": p.name, "count": c} for p, c in zip(written, counts)],
             "total": sum(counts)}
    (out / f".{INDEX_FILE}.tmp").write_text(json.dumps(index, indent=1) + "\n")
    os.replace(out / f".{INDEX_FILE}.tmp", out / INDEX_FILE)
    return written


def folder_samples(folder) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of an image folder (data/folder.py's rules for captions and labels) as shard members: the
    image file's own bytes (not re-encoded), ``txt`` with its caption, ``cls`` with its label id."""
    from .folder import ImageFolder

    ds = ImageFolder(folder, size=8)  # the size is not used: files are copied, not decoded
    for i, path in enumerate(ds.paths):
        parts = {Path(path).suffix[1:].lower(): Path(path).read_bytes()}
        if ds.captions is not None:
            parts["txt"] = ds.captions[i].encode("utf-8")
        if ds.labels is not None:
            parts["cls"] = str(ds.labels[i]).encode()
        yield f"{i:09d}", parts


def shard_folder(folder, out, *, shard_size: int = 1000) -> list[Path]:
    """``latentdiff shard FOLDER OUT``: the images of ``folder`` into webdataset shards in ``out`` (a folder that
    must not hold shards yet; on an error nothing is left behind but what was there)."""
    out = Path(out)
    if out.is_dir() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds shards; choose an empty folder (nothing there was changed)")
    existed = out.exists()
    try:
        return write_shards(folder_samples(folder), out, shard_size=shard_size)
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
