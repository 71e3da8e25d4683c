"""Latents at scale: a frozen first stage encodes sharded data once into sharded latents (``latentdiff encode``).

Input shard i (in the order :func:`shards.expand_urls` gives) becomes ``out/latents-{i:06d}.tar``, a webdataset shard
whose sample ``key`` holds ``key.mean.npy`` (μ of q(z|x), float32 (C, h, w)), ``key.std.npy`` (σ, KL first
stages only) and the sample's own ``txt`` / ``cls`` / ``json`` members unchanged. Training draws z = μ + σ·ε
itself each time it sees a sample (LDM samples the posterior; Kingma & Welling 2014, eq. 10), from the RNG that
checkpoints save. The latent scale is not applied (the diffusion model multiplies at use).

Split over processes: with ``RANK`` / ``WORLD_SIZE`` set (``accelerate launch``, ``torchrun``), process r encodes the
input shards i with i % world == r; no process group is needed. Resume after a kill: an output shard is written
under a temporary name and renamed when complete, so a rerun skips every shard that exists and redoes the rest.
``latents.json`` (the autoencoder's hash, latent shape, the input spec) is written first, and a rerun with another
autoencoder, size or input is refused; whichever process finds all shards complete writes ``index.json``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..fileio import read_json
from .latent_cache import autoencoder_hash
from .shards import INDEX_FILE, _add_member, decode_sample, expand_urls, iter_samples

META_FILE = "latents.json"
KEPT = ("txt", "cls", "json")  # members copied from the input sample


def output_name(i: int) -> str:
    return f"latents-{i:06d}.tar"


def _npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return buf.getvalue()


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment that ``accelerate launch`` and ``torchrun`` set."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@torch.no_grad()
def _encode_batch(model, items: list[dict], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.stack([it["image"] for it in items]).to(device)
    if model.config.regularizer == "kl":
        post = model.posterior(x)  # q(z|x) = N(μ, diag σ²)
        return post.mean.float().cpu(), post.std.float().cpu()
    return model.encode(x).float().cpu(), None  # VQ: the pre-quantisation latent


def encode_shard(url: str, dest: Path, model, *, size, channels: int, batch_size: int, device) -> int:
    """Encode the samples of shard ``url`` into ``dest`` (via a temporary file); returns the sample count."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    n = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        pending: list[tuple[str, dict, dict]] = []

        def flush():
            mean, std = _encode_batch(model, [item for _, _, item in pending], device)
            for j, (key, parts, _) in enumerate(pending):
                _add_member(tar, f"{key}.mean.npy", _npy(mean[j].contiguous()))
                if std is not None:
                    _add_member(tar, f"{key}.std.npy", _npy(std[j].contiguous()))
                for ext in KEPT:
                    if ext in parts:
                        _add_member(tar, f"{key}.{ext}", parts[ext])
            pending.clear()

        for key, parts in iter_samples(url):
            pending.append((key, parts, decode_sample(key, parts, size=size, channels=channels, url=url)))
            n += 1
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    os.replace(tmp, dest)
    return n


def encode_shards(spec, autoencoder, out, *, size: int, batch_size: int = 64, rank: int = 0, world_size: int = 1,
                  device=None, progress: bool = True) -> dict:
    """Encode this process's input shards of ``spec`` into ``out`` (skipping complete ones); returns
    {"encoded": [names], "skipped": [names], "complete": whether all shards of all processes exist}."""
    urls = expand_urls(spec)
    model = getattr(autoencoder, "module", autoencoder).eval()
    cfg = model.config
    if size % cfg.f:
        raise ConfigError(f"--size {size} is not a multiple of the autoencoder's downsampling factor f={cfg.f}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ae_hash = autoencoder_hash(model)
    meta = {"format": "latentdiff-latent-shards", "autoencoder_sha256": ae_hash, "regularizer": cfg.regularizer,
            "latent_shape": [cfg.embed_dim, size // cfg.f, size // cfg.f], "size": size, "channels": cfg.in_channels,
            "latent_scale": model.latent_scale,
            "source": [str(s) for s in (spec if isinstance(spec, list) else [spec])],
            "shards": len(urls)}
    _check_meta(out, meta)
    if not (out / META_FILE).is_file():  # first: a later run with another autoencoder is refused
        _write_json(out, META_FILE, meta)
    done = {"encoded": [], "skipped": [], "complete": False}
    mine = [i for i in range(len(urls)) if i % world_size == rank]
    for i in mine:
        dest = out / output_name(i)
        if dest.is_file():
            done["skipped"].append(dest.name)
            continue
        n = encode_shard(urls[i], dest, model, size=(size, size), channels=cfg.in_channels, batch_size=batch_size,
                         device=device)
        done["encoded"].append(dest.name)
        if progress:
            print(f"rank {rank}: {urls[i]} -> {dest} ({n} samples)", flush=True)
    if all((out / output_name(i)).is_file() for i in range(len(urls))):
        _write_index(out, len(urls), meta)
        done["complete"] = True
    return done


def _check_meta(out: Path, meta: dict) -> None:
    """A folder with latents of another autoencoder, size or input is an error (nothing is overwritten)."""
    path = out / META_FILE
    if not path.is_file():
        return
    old = read_json(path, DataError)
    for k in ("autoencoder_sha256", "latent_shape", "source"):
        if old.get(k) != meta[k]:
            raise ConfigError(f"{out} holds latents made with another {k} ({old.get(k)} != {meta[k]}); "
                              "choose another --out (nothing there was changed)")


def _write_index(out: Path, num: int, meta: dict) -> None:
    counts = []
    for i in range(num):
        with tarfile.open(out / output_name(i)) as tar:
            counts.append(sum(1 for m in tar.getmembers() if m.name.endswith(".mean.npy")))
    index = {"format": "webdataset", "shards": [{"name": output_name(i), "count": c} for i, c in enumerate(counts)],
             "total": sum(counts)}
    _write_json(out, INDEX_FILE, index)


def _write_json(out: Path, name: str, content: dict) -> None:
    tmp = out / f".{name}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, out / name)


def read_meta(folder) -> dict | None:
    path = Path(folder) / META_FILE
    return read_json(path, DataError) if path.is_file() else None
