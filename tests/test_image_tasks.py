"""Super-resolution, inpainting and image-to-image (LDM sec. 4.4-4.5; SDEdit): tiny models trained a few steps
from configs, sampled through `latentdiff sample --image / --mask / --init-image`, and the bad inputs refused."""

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.config import ConfigError, load_config
from latentdiff.data.masks import random_masks
from latentdiff.errors import RequestError
from latentdiff.recipes import find_recipe
from latentdiff.spatial import build_spatial
from latentdiff.train.run import train_from_config

COMMON = """
diffusion: {schedule: cosine, num_steps: 50}
data: {name: shapes, size: 16, options: {length: 32}}
train: {steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, checkpoint_every: 2, sample_every: 0, log_every: 1,
        mixed_precision: "no"}
sample: {sampler: ddim, steps: 3, guidance: 1.0, num: 1, batch_size: 4}
"""
SR = COMMON + """
model: {preset: tiny, channel_mult: [1, 2, 2]}   # downsampling 4: outputs of sides 4k, low-resolution sides 2k
conditioning: {kind: null, mode: concat, concat: low_res, rescaler: {n_stages: 1, multiplier: 2, method: bicubic},
               concat_options: {factor: 2, noise_levels: 3, sample_level: 1}}
"""
INPAINT = COMMON + """
model: {preset: tiny}
conditioning: {kind: null, mode: concat, concat: inpaint, concat_options: {latent_channels: 3}}
"""
PLAIN = COMMON + "model: {preset: tiny}\n"  # an unconditional model: no image conditioning


def _train(folder, name, text, *overrides):
    (folder / f"{name}.yaml").write_text(text)
    train_from_config(load_config(folder / f"{name}.yaml", overrides), folder / name, progress=False)
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagetasks")
    plain = _train(folder, "plain", PLAIN)
    return {"sr": _train(folder, "sr", SR), "inpaint": _train(folder, "inpaint", INPAINT, f"train.init_from={plain}"),
            "plain": plain, "folder": folder}


def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def _sample(model, *args):
    return main(["sample", str(model), "--quiet", *args])


# ---- the mask generator and the conditions ---------------------------------------------------------------------


def test_masks_cover_the_requested_fraction_range():
    m = random_masks(600, (32, 32), generator=torch.Generator().manual_seed(0))
    assert m.shape == (600, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    share = m.mean((1, 2, 3))
    full = share == 1
    partial = share[~full]
    assert 0.05 < full.float().mean() < 0.15  # the all-masked share (full_fraction 0.1)
    assert partial.min() >= 0.1 and partial.max() <= 0.6  # every partial mask within 10-60 %
    assert partial.min() < 0.13 and partial.max() > 0.57  # and the range is covered, ends included
    assert torch.equal(m, random_masks(600, (32, 32), generator=torch.Generator().manual_seed(0)))
    small = random_masks(200, (8, 12), generator=torch.Generator().manual_seed(1), full_fraction=0.0,
                         min_fraction=0.2, max_fraction=0.3)
    assert small.mean((1, 2, 3)).min() >= 0.2 and small.mean((1, 2, 3)).max() <= 0.3
    with pytest.raises(ConfigError, match="min_fraction <= max_fraction"):
        random_masks(1, (8, 8), min_fraction=0.7, max_fraction=0.6)


def test_low_res_condition_noise_augmentation_and_level():
    cond = build_spatial("low_res", {"factor": 4, "noise_levels": 4, "max_noise": 0.3})
    assert cond.adm_classes == 4 and cond.channels == 3
    image = torch.rand(3, 32, 32) * 2 - 1
    item = cond.derive({"image": image})
    assert torch.allclose(item["low_res"], image.view(3, 8, 4, 8, 4).mean((2, 4)), atol=1e-6)  # box filter
    low = item["low_res"][None].expand(64, -1, -1, -1)
    train = cond.inputs({"low_res": low}, training=True, generator=torch.Generator().manual_seed(0))
    assert train["y"].shape == (64,) and set(train["y"].tolist()) == {0, 1, 2, 3}
    clean = train["y"] == 0
    assert torch.allclose(train["concat"][clean], low[clean])  # level 0 adds no noise
    assert not torch.allclose(train["concat"][~clean], low[~clean])
    sample = cond.inputs({"low_res": low[:2], "noise_level": 2}, generator=torch.Generator().manual_seed(0))
    assert sample["y"].tolist() == [2, 2]
    with pytest.raises(RequestError, match="noise_level must be one level"):
        cond.inputs({"low_res": low[:2], "noise_level": 4})
    with pytest.raises(RequestError, match="has 1 channel"):
        cond.inputs({"low_res": low[:, :1]})
    with pytest.raises(ConfigError, match="noise_levels must be 0"):
        build_spatial("low_res", {"noise_levels": 1})


def test_inpaint_condition_mask_on_the_latent_grid_and_masked_latent():
    cond = build_spatial("inpaint", {"latent_channels": 4})
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :4] = 1
    seen = {}

    def encode(x):  # a stand-in first stage, f = 4, that records what it is given
        seen["x"] = x
        return torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1]], 1), 4)

    c = cond.inputs({"image": image, "mask": mask}, encode=encode)["concat"]
    assert c.shape == (2, 5, 4, 4)
    assert torch.equal(seen["x"][:, :, :8, :4], torch.zeros(2, 3, 8, 4))  # the fill region is blanked
    assert torch.equal(seen["x"][:, :, 8:], image[:, :, 8:])
    assert torch.equal(c[:, 0, :2, :1], torch.ones(2, 2, 1)) and c[:, 0, 2:].abs().sum() == 0
    drawn = cond.inputs({"image": image}, training=True, encode=encode)["concat"]  # training draws masks
    assert drawn.shape == (2, 5, 4, 4)
    with pytest.raises(RequestError, match="needs a mask"):
        cond.inputs({"image": image}, encode=encode)
    with pytest.raises(RequestError, match=r"single-channel, the image's size"):
        cond.inputs({"image": image, "mask": mask.expand(-1, 3, -1, -1)}, encode=encode)
    with pytest.raises(ConfigError, match="latent_channels is required"):
        build_spatial("inpaint")


# ---- trained models through the command ------------------------------------------------------------------------


def test_super_resolution_through_the_command(runs, tmp_path):
    pipe = latentdiff.load(runs["sr"])
    assert pipe.unet.config.num_classes == 3 and pipe.num_classes is None  # the noise level is the U-Net's label
    rng = np.random.default_rng(0)
    low = _png(tmp_path / "low.png", rng.integers(0, 255, (8, 8, 3)))
    assert _sample(runs["sr"], "--image", low, "--out", str(tmp_path / "high.png")) == 0
    assert Image.open(tmp_path / "high.png").size == (16, 16)
    (tmp_path / "lows").mkdir()
    for name in ("a", "b"):  # a folder of larger inputs: each upscaled convolutionally
        _png(tmp_path / "lows" / f"{name}.png", rng.integers(0, 255, (12, 16, 3)))
    assert _sample(runs["sr"], "--image", str(tmp_path / "lows"), "--out", str(tmp_path / "highs")) == 0
    assert sorted(p.name for p in (tmp_path / "highs").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "highs" / "a.png").size == (32, 24)
    # Or in overlapping tiles of the training size (8x8 here), blended at the seams.
    assert _sample(runs["sr"], "--image", str(tmp_path / "lows"), "--tile", "--out", str(tmp_path / "tiled")) == 0
    assert Image.open(tmp_path / "tiled" / "a.png").size == (32, 24)
    # The condition reaches the network: another low-resolution image changes the result from the same noise.
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    a = pipe.sample(1, conditions={"low_res": x}, seed=0, output="tensor")
    b = pipe.sample(1, conditions={"low_res": -x}, seed=0, output="tensor")
    assert (a - b).abs().max() > 1e-4
    levels = pipe.sample(2, conditions={"low_res": x, "noise_level": torch.tensor([0, 2])}, seed=0, output="tensor")
    assert torch.allclose(levels[:1], pipe.sample(1, conditions={"low_res": x, "noise_level": 0}, seed=0,
                                                  output="tensor"), atol=1e-5)  # image 0 at level 0 either way


def test_inpainting_through_the_command(runs, tmp_path):
    pipe = latentdiff.load(runs["inpaint"])
    assert pipe.unet.config.concat_channels == 4
    rng = np.random.default_rng(0)
    img = _png(tmp_path / "img.png", rng.integers(0, 255, (16, 16, 3)))
    mask = np.zeros((16, 16))
    mask[4:12, 2:10] = 255
    m = _png(tmp_path / "mask.png", mask)
    assert _sample(runs["inpaint"], "--image", img, "--mask", m, "--num", "2", "--out", str(tmp_path / "g.png")) == 0
    assert Image.open(tmp_path / "g.png").size[0] > 16  # input + 2 results in one row
    assert _sample(runs["inpaint"], "--image", img, "--mask", m, "--out", str(tmp_path / "one.png")) == 0
    assert Image.open(tmp_path / "one.png").size == (16, 16)


def test_init_from_zero_initialises_the_new_input_channels(tmp_path):
    plain = _train(tmp_path, "plain", PLAIN)
    inpaint = _train(tmp_path, "inpaint", INPAINT.replace("steps: 2,", "steps: 1,"),
                     f"train.init_from={plain}", "train.lr=1.0e-12")
    a, b = latentdiff.load(plain), latentdiff.load(inpaint, ema=False)  # init_from reads the EMA weights
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 30])
    concat = torch.randn(2, 4, 16, 16)
    # At the start the inpainting U-Net computes what the plain one does, whatever the mask and masked image.
    assert torch.allclose(b.unet(x, t, concat=concat), a.unet(x, t), atol=1e-4)
    w = next(p for p in b.unet.parameters() if p.dim() == 4)
    assert w.shape[1] == 7 and w[:, 3:].abs().max() < 1e-6


def test_image_to_image_through_the_api_and_the_command(runs, tmp_path):
    pipe = latentdiff.load(runs["plain"])
    init = torch.rand(2, 3, 16, 16) * 2 - 1
    calls = []
    encode = pipe.encode
    pipe.encode = lambda x, generator=None: calls.append(x.shape) or encode(x, generator=generator)
    near = pipe.sample(2, init_image=init, strength=0.05, steps=20, seed=0, output="tensor")
    far = pipe.sample(2, init_image=init, strength=1.0, steps=20, seed=0, output="tensor")
    assert calls == [(2, 3, 16, 16)] * 2  # the image goes through the first stage (identity for pixels)
    assert (near - init).abs().mean() < 0.5 * (far - init).abs().mean()
    with pytest.raises(RequestError, match=r"strength must lie in \(0, 1\]"):
        pipe.sample(1, init_image=init[:1], strength=1.5)
    img = _png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 255, (16, 16, 3)))
    assert _sample(runs["plain"], "--init-image", img, "--strength", "0.6", "--out", str(tmp_path / "o.png")) == 0
    assert Image.open(tmp_path / "o.png").size == (16, 16)


def test_latent_inpainting_refuses_the_cache_and_trains_without_it(tmp_path):
    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder

    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=16,
                                       z_channels=4, embed_dim=4))  # a tiny untrained KL-f4 first stage
    save_autoencoder(ae, str(tmp_path / "ae"), latent_scale=0.5)
    text = INPAINT.replace("latent_channels: 3", "latent_channels: 4") + f"latent: {{first_stage: {tmp_path / 'ae'}}}\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="set latent.cache=false"):
        train_from_config(load_config(tmp_path / "c.yaml"), tmp_path / "cached", progress=False)
    assert not (tmp_path / "cached").exists()  # refused before anything was written
    train_from_config(load_config(tmp_path / "c.yaml", ["latent.cache=false"]), tmp_path / "run", progress=False)
    pipe = latentdiff.load(tmp_path / "run")
    assert pipe.unet.config.concat_channels == 5 and pipe.sample_shape == (4, 4, 4)  # z_t 4 + mask 1 + ℰ(masked) 4
    img = _png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 255, (16, 16, 3)))
    mask = np.zeros((16, 16))
    mask[:8] = 255
    args = ["--image", img, "--mask", _png(tmp_path / "m.png", mask), "--out", str(tmp_path / "o.png")]
    assert _sample(tmp_path / "run", *args) == 0
    assert Image.open(tmp_path / "o.png").size == (16, 16)


@pytest.mark.parametrize("case", ["mask_size", "mask_rgb", "low_res_size", "image_on_plain", "strength_0",
                                  "strength_big", "mask_on_sr"])
def test_bad_inputs_one_line_error_nothing_written(runs, tmp_path, capsys, case):
    rng = np.random.default_rng(0)
    img = _png(tmp_path / "img.png", rng.integers(0, 255, (16, 16, 3)))
    args = {
        "mask_size": (runs["inpaint"], "--image", img, "--mask", _png(tmp_path / "m1.png", np.zeros((8, 16)))),
        "mask_rgb": (runs["inpaint"], "--image", img, "--mask", _png(tmp_path / "m2.png", np.zeros((16, 16, 3)))),
        "low_res_size": (runs["sr"], "--image", _png(tmp_path / "low.png", rng.integers(0, 255, (7, 8, 3)))),
        "image_on_plain": (runs["plain"], "--image", img),
        "strength_0": (runs["plain"], "--init-image", img, "--strength", "0"),
        "strength_big": (runs["plain"], "--init-image", img, "--strength", "1.01"),
        "mask_on_sr": (runs["sr"], "--image", img, "--mask", _png(tmp_path / "m.png", np.zeros((16, 16)))),
    }[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _sample(*args, "--out", str(out / "x.png")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latentdiff sample: error: ")
    expected = {"mask_size": "must be the same size", "mask_rgb": "single-channel", "low_res_size": "multiples of",
                "image_on_plain": "not conditioned on an image", "strength_0": r"(0, 1]", "strength_big": r"(0, 1]",
                "mask_on_sr": "super-resolution model"}[case]
    assert expected in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()


def test_photos_dataset_and_recipe_load():
    pytest.importorskip("sklearn")
    from latentdiff.data import make_dataset

    train = make_dataset("photos", size=32, options={"length": 4})
    test = make_dataset("photos", size=32, split="test", options={"length": 4})
    a = train[0]["image"]
    assert a.shape == (3, 32, 32) and -1 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, make_dataset("photos", size=32, options={"length": 4})[0]["image"])  # deterministic
    assert not torch.equal(a, test[0]["image"])
    config = load_config(find_recipe("photos_sr4"))
    assert config.conditioning.concat == "low_res" and config.data.name == "photos"


def test_tile_offsets_and_blend_weights():
    from latentdiff.tiling import ramp, tile_starts

    assert tile_starts(16, 8, 4) == [0, 4, 8] and tile_starts(13, 8, 4) == [0, 4, 5] and tile_starts(8, 8, 4) == [0]
    w = ramp(32, 16)
    assert w.min() > 0 and w.max() <= 1 and torch.equal(w, w.flip(0)) and ramp(40, 16)[16:24].eq(1).all()
    # Two tiles overlapping by 16 of 32: their ramps sum to a constant over the overlap (no seam in the weights).
    assert torch.allclose(w[16:] + w[:16], torch.full((16,), w[16] + w[0]))
