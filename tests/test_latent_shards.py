"""`latentdiff shard` and `latentdiff encode`: sharded latents (posterior mean and std + captions), split over
processes by RANK/WORLD_SIZE, resumed after a kill, refused for another autoencoder; streamed back for training."""

import json

import numpy as np
import torch
from PIL import Image

from latentdiff.data.latent_shards import META_FILE
from latentdiff.data.shards import ShardStream, decode_sample, iter_samples
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder

from helpers.clitools import run_cli


def tiny_ae(seed=0):
    torch.manual_seed(seed)
    cfg = AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=8, z_channels=2,
                            embed_dim=2, regularizer="kl")
    return Autoencoder(cfg).eval()


def make_folder(root, n=10):
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"im{i:02d}.png")
        (root / f"im{i:02d}.txt").write_text(f"a red circle {i}")


def setup(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    rc, out, err = run_cli(capsys, "shard", tmp_path / "imgs", tmp_path / "shards", "--shard-size", 4)
    assert rc == 0 and "wrote 3 shard(s)" in out, err
    ae = tiny_ae()
    save_autoencoder(ae, str(tmp_path / "ae"), latent_scale=0.5)
    return ae


def test_encode_matches_the_posterior_and_streams_back(tmp_path, capsys):
    ae = setup(tmp_path, capsys)
    rc, out, err = run_cli(capsys, "encode", tmp_path / "shards", "--first-stage", tmp_path / "ae", "--out",
                           tmp_path / "lat", "--batch-size", 3, "--quiet")
    assert rc == 0 and "encoded 3 shard(s), 0 already done; all shards complete" in out, err
    meta = json.loads((tmp_path / "lat" / META_FILE).read_text())
    assert meta["latent_shape"] == [2, 4, 4] and meta["latent_scale"] == 0.5
    src = [decode_sample(k, p) for k, p in iter_samples(str(tmp_path / "shards" / "shard-000001.tar"))]
    got = [decode_sample(k, p) for k, p in iter_samples(str(tmp_path / "lat" / "latents-000001.tar"))]
    assert [g["key"] for g in got] == [s["key"] for s in src] and got[0]["caption"] == src[0]["caption"]
    with torch.no_grad():
        post = ae.posterior(torch.stack([s["image"] for s in src]))
    torch.testing.assert_close(torch.stack([g["latent_mean"] for g in got]), post.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([g["latent_std"] for g in got]), post.std, atol=1e-5, rtol=1e-5)
    stream = ShardStream(tmp_path / "lat", shuffle_buffer=0).configured(batch_size=5)
    batch = next(iter(stream))
    assert batch["latent_mean"].shape == (5, 2, 4, 4) and len(batch["caption"]) == 5
    assert stream.num_samples == 10


def test_ranks_split_the_shards_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    setup(tmp_path, capsys)
    args = ("encode", tmp_path / "shards", "--first-stage", tmp_path / "ae", "--out", tmp_path / "lat", "--quiet")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "rank 0/2: encoded 2 shard(s)" in out and "complete" not in out
    assert sorted(p.name for p in (tmp_path / "lat").glob("*.tar")) == ["latents-000000.tar", "latents-000002.tar"]
    monkeypatch.setenv("RANK", "1")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "rank 1/2: encoded 1 shard(s)" in out and "all shards complete" in out
    # A kill mid-shard leaves a temporary file and no output shard: the rerun redoes that shard only.
    (tmp_path / "lat" / "latents-000002.tar").unlink()
    (tmp_path / "lat" / ".latents-000002.tar.tmp123").write_bytes(b"partial")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "encoded 1 shard(s), 2 already done; all shards complete" in out
    assert json.loads((tmp_path / "lat" / "index.json").read_text())["total"] == 10


def test_another_autoencoder_is_refused(tmp_path, capsys):
    setup(tmp_path, capsys)
    run_cli(capsys, "encode", tmp_path / "shards", "--first-stage", tmp_path / "ae", "--out", tmp_path / "lat")
    save_autoencoder(tiny_ae(seed=1), str(tmp_path / "ae2"))
    before = sorted(p.name for p in (tmp_path / "lat").iterdir())
    rc, _, err = run_cli(capsys, "encode", tmp_path / "shards", "--first-stage", tmp_path / "ae2", "--out",
                         tmp_path / "lat")
    assert rc == 2 and "another autoencoder_sha256" in err
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == before


def test_bad_arguments(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "shard", tmp_path / "nothing", tmp_path / "out")
    assert rc == 2 and "does not exist" in err and not (tmp_path / "out").exists()
    rc, _, err = run_cli(capsys, "encode", tmp_path / "none.tar", "--first-stage", tmp_path, "--out", tmp_path / "o")
    assert rc == 2 and "not found" in err
