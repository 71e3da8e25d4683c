"""Diffusion training on streamed shards: latent text-to-image from `latentdiff encode`'s shards (data.name=shards),
a run resumed from its checkpoint continues the stream exactly (the same weights as an uninterrupted run), and a
mismatched first stage is refused."""

import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiff.config import ConfigError, load_config
from latentdiff.data import make_dataset
from latentdiff.data.shards import write_shards
from latentdiff.data.transforms import to_pil
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from latentdiff.train.run import train_from_config

from helpers.clitools import captured

TEXT = """
model: {preset: tiny}
diffusion: {schedule: scaled_linear, num_steps: 50}
data: {name: shards, options: {shuffle_buffer: 5}}
conditioning: {kind: text, vocab_pool: 24, text: {width: 16, depth: 1, heads: 2}}
train: {steps: 4, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.2, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no", deterministic: true}
sample: {sampler: ddim, steps: 2, num: 2, batch_size: 2, prompts: ["a red circle at the top left"]}
"""


def shapes_samples(n=24):
    ds = make_dataset("shapes", size=16, options={"length": n})
    for i in range(n):
        item = ds[i]
        buf = io.BytesIO()
        to_pil(item["image"]).save(buf, format="PNG")
        yield f"{i:05d}", {"png": buf.getvalue(), "txt": item["caption"].encode()}


def make_ae(folder: Path, seed=0) -> Path:
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       z_channels=4, embed_dim=4))
    save_autoencoder(ae, str(folder), latent_scale=0.5)
    return folder


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_shards(shapes_samples(), root / "shards", shard_size=6)
    ae = make_ae(root / "ae")
    rc, out, err = captured("encode", root / "shards", "--first-stage", ae, "--out", root / "lat", "--quiet")
    assert rc == 0, err
    (root / "cfg.yaml").write_text(TEXT)
    return root


def config(root: Path, *overrides):
    return load_config(root / "cfg.yaml", [f"data.root={root / 'lat'}", f"latent.first_stage={root / 'ae'}",
                                           *overrides])


def weights(run: Path, step: int):
    return load_file(run / "checkpoints" / f"step_{step:07d}" / "models" / "unet.safetensors")


def test_latent_shards_train_and_resume_exactly(latent_shards, tmp_path):
    root = latent_shards
    full = train_from_config(config(root), tmp_path / "full", progress=False)
    assert full.step == 4
    train_from_config(config(root, "train.steps=2"), tmp_path / "cut", progress=False)
    resumed = train_from_config(config(root), tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 4
    a, b = weights(tmp_path / "full", 4), weights(tmp_path / "cut", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The stream moved on: the step-2 and step-4 weights differ.
    w2 = weights(tmp_path / "full", 2)
    assert any(not torch.equal(a[k], w2[k]) for k in a)


def test_latent_shards_of_another_first_stage_are_refused(latent_shards, tmp_path):
    other = make_ae(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="another autoencoder"):
        train_from_config(config(latent_shards, f"latent.first_stage={other}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_image_shards_need_a_size(latent_shards, tmp_path):
    cfg = load_config(latent_shards / "cfg.yaml", [f"data.root={latent_shards / 'shards'}"])
    with pytest.raises(ConfigError, match="set data.size"):
        train_from_config(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_pixel_diffusion_streams_image_shards(latent_shards, tmp_path):
    cfg = load_config(latent_shards / "cfg.yaml", [f"data.root={latent_shards / 'shards'}", "data.size=8",
                                                   "train.steps=2", "train.num_workers=2", "train.deterministic=false"])
    result = train_from_config(cfg, tmp_path / "run", progress=False)
    assert result.step == 2 and (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()
