"""Webdataset shards: writing, reading (paths, globs, braces, pipe:), the webdataset package as a format oracle,
the split over processes and workers (no sample twice per epoch), buffer shuffling, and exact resume."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.config import TrainConfig
from latentdiff.data.shards import (
    POSITION_KEY,
    ShardStream,
    decode_sample,
    expand_urls,
    iter_samples,
    shard_folder,
    shuffled,
    write_shards,
)
from latentdiff.errors import ConfigError, DataError, MissingFileError
from latentdiff.train.data import BatchStream


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n: int):
    for i in range(n):
        yield f"{i:05d}", {"png": _png(i), "txt": f"caption {i}".encode(), "cls": str(i % 3).encode()}


@pytest.fixture
def shards(tmp_path):
    write_shards(_samples(40), tmp_path / "s", shard_size=5)  # 8 shards of 5
    return tmp_path / "s"


def _keys(batch):
    return list(batch["key"])


def test_write_read_and_index(shards):
    urls = expand_urls(shards)
    assert len(urls) == 8 and urls == sorted(urls)
    assert json.loads((shards / "index.json").read_text())["total"] == 40
    samples = list(iter_samples(urls[1]))
    assert [k for k, _ in samples] == ["00005", "00006", "00007", "00008", "00009"]
    item = decode_sample(*samples[0], size=4)
    assert item["image"].shape == (3, 4, 4) and item["caption"] == "caption 5" and item["label"] == 2
    assert torch.allclose(item["image"], torch.full((3, 4, 4), 5 / 127.5 - 1))
    assert ShardStream(shards).num_samples == 40


def test_specs_glob_braces_pipe(shards):
    assert len(expand_urls(str(shards / "*.tar"))) == 8
    braces = expand_urls(str(shards / "shard-{000002..000004}.tar"))
    assert [u[-10:] for u in braces] == ["000002.tar", "000003.tar", "000004.tar"]
    assert expand_urls(f"pipe:cat {shards}/shard-{{000001..000002}}.tar") == [
        f"pipe:cat {shards}/shard-000001.tar", f"pipe:cat {shards}/shard-000002.tar"]
    piped = list(iter_samples(f"pipe:cat {shards / 'shard-000003.tar'}"))
    assert [k for k, _ in piped] == list(k for k, _ in iter_samples(str(shards / "shard-000003.tar")))
    with pytest.raises(MissingFileError, match="nope"):
        expand_urls(str(shards / "nope.tar"))
    with pytest.raises(DataError, match="exit status"):
        list(iter_samples("pipe:cat /nonexistent/x.tar"))


def test_webdataset_package_reads_our_shards_and_we_read_its(shards, tmp_path):
    import webdataset as wds  # the test extra installs it
    theirs = [s["__key__"] for s in wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False)]
    assert theirs == ["00000", "00001", "00002", "00003", "00004"]
    with wds.TarWriter(str(tmp_path / "w.tar")) as w:
        w.write({"__key__": "a", "png": _png(7), "json": json.dumps({"text": "hi", "label": 2}).encode()})
    (key, parts), = iter_samples(str(tmp_path / "w.tar"))
    item = decode_sample(key, parts)
    assert key == "a" and item["caption"] == "hi" and item["label"] == 2


def test_bad_shard_and_sample_errors(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="bad.tar"):
        list(iter_samples(str(tmp_path / "bad.tar")))
    with pytest.raises(DataError, match="sample 'k' has no image"):
        decode_sample("k", {"txt": b"x"})


def test_shuffle_buffer_is_a_permutation():
    out = list(shuffled(range(100), 10, np.random.default_rng(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(shuffled(range(5), 0, np.random.default_rng(0))) == list(range(5))


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (4, 1)])
def test_split_reads_every_sample_once_per_epoch(shards, world, workers):
    n = world * workers
    seen = Counter()
    for rank in range(world):
        s = ShardStream(shards, shuffle_buffer=4, seed=3).configured(batch_size=1, world_size=world, rank=rank)
        for g in s.worker_ids(workers):
            seen.update(key for _, key, _ in s.epoch_samples(epoch=0, g=g, n=n))
    assert sorted(seen) == [f"{i:05d}" for i in range(40)] and set(seen.values()) == {1}


def test_epochs_differ_and_repeat_from_the_seed(shards):
    s = ShardStream(shards, shuffle_buffer=8, seed=1)
    e0 = [k for _, k, _ in s.epoch_samples(0, 0, 1)]
    assert e0 == [k for _, k, _ in ShardStream(shards, shuffle_buffer=8, seed=1).epoch_samples(0, 0, 1)]
    assert e0 != [k for _, k, _ in s.epoch_samples(1, 0, 1)]


def test_too_few_shards_for_the_processes(shards):
    with pytest.raises(ConfigError, match="8 shard"):
        ShardStream(shards).configured(batch_size=1, world_size=9)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_stream_resumes_exactly(shards, workers):
    """Draw 7 batches, save the position, draw 9 more (crossing an epoch); a new stream seeked to the position
    gives the same 9."""
    config = TrainConfig(batch_size=4, num_workers=workers)

    def stream():
        return BatchStream(ShardStream(shards, size=4, shuffle_buffer=6, seed=2), config, world_size=1, rank=0,
                           device=torch.device("cpu"))

    a = stream()
    first = [_keys(a.next()) for _ in range(7)]
    pos = json.loads(json.dumps(a.position()))  # as a checkpoint's state.json holds it
    rest = [_keys(a.next()) for _ in range(9)]
    b = stream()
    b.seek(pos)
    assert [_keys(b.next()) for _ in range(9)] == rest
    epoch0 = [k for ks in (first + rest)[:10] for k in ks]
    assert sorted(epoch0) == [f"{i:05d}" for i in range(40)]  # 40 samples / batch 4: epoch 0 is 10 batches
    assert a.epoch == 1 and POSITION_KEY not in a.next()


def test_shard_folder(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((6, 6, 3), 10 * i, np.uint8)).save(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text(f"picture {i}")
    written = shard_folder(src, tmp_path / "out", shard_size=2)
    assert [p.name for p in written] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    items = [decode_sample(k, p) for u in written for k, p in iter_samples(str(u))]
    assert sorted(i["caption"] for i in items) == [f"picture {i}" for i in range(5)]
    assert (src / "im0.png").read_bytes() == dict(iter_samples(str(written[0])))["000000000"]["png"]
    with pytest.raises(ConfigError, match="already holds shards"):
        shard_folder(src, tmp_path / "out")
