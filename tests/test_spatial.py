"""Spatial conditions (LDM sec. 3.3, concat mode): one builder of the concat input for training and sampling.

A tiny pixel-space model conditioned on the shapes world's segmentation map alone (mode concat) trains a few
steps from a config, then samples through ``Pipeline.sample(conditions=...)`` at the training size and, the U-Net
running convolutionally, at a larger size that the map implies.
"""

import pytest
import torch

import latentdiff
from latentdiff.config import ConfigError, load_config
from latentdiff.errors import RequestError
from latentdiff.pipeline import Pipeline
from latentdiff.spatial import Segmentation, build_spatial
from latentdiff.train.run import train_from_config

CLASSES = 21  # the shapes world's default 3 shapes x 7 colours
TEXT = f"""
model: {{preset: tiny}}
diffusion: {{schedule: cosine, num_steps: 50}}
data: {{name: shapes, size: 16, options: {{length: 32}}}}
conditioning: {{kind: null, mode: concat, concat: segmentation, concat_options: {{classes: {CLASSES}}}}}
train: {{steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.0, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no"}}
sample: {{sampler: ddim, steps: 3, guidance: 1.0, num: 2, batch_size: 2}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    (folder / "c.yaml").write_text(TEXT)
    config = load_config(folder / "c.yaml")
    train_from_config(config, folder / "run", progress=False)
    return folder / "run"


def test_segmentation_one_hot_and_range():
    seg = torch.tensor([[[0, 1], [CLASSES, 2]]])
    x = Segmentation(classes=CLASSES).make({"segmentation": seg})
    assert x.shape == (1, CLASSES + 1, 2, 2)
    assert torch.equal(x.argmax(1), seg) and torch.equal(x.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(RequestError, match=rf"class id\(s\) \[{CLASSES + 1}\]"):
        Segmentation(classes=CLASSES).make({"segmentation": seg + 1})
    with pytest.raises(RequestError, match="needs the field 'segmentation'"):
        Segmentation(classes=CLASSES).make({"image": seg})


def test_unknown_condition_and_option():
    with pytest.raises(ConfigError, match="unknown spatial condition 'depth'"):
        build_spatial("depth")
    with pytest.raises(ConfigError, match=r"takes no option\(s\) \['size'\]"):
        build_spatial("segmentation", {"classes": 3, "size": 4})


def test_trained_model_samples_from_a_map_at_two_sizes(run):
    pipe = latentdiff.load(run)
    assert pipe.condition_fields == ("segmentation",)
    assert pipe.unet.config.concat_channels == CLASSES + 1
    seg = torch.zeros(1, 16, 16, dtype=torch.long)
    seg[:, 4:12, 4:12] = 3
    out = pipe.sample(2, conditions={"segmentation": seg}, seed=0, output="tensor")
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    wide = torch.zeros(2, 16, 32, dtype=torch.long)  # the map implies the size: 16x32, sampled convolutionally
    out = pipe.sample(2, conditions={"segmentation": wide}, seed=0, output="tensor")
    assert out.shape == (2, 3, 16, 32)
    # The condition reaches the network: another map changes the sample drawn from the same noise.
    other = pipe.sample(2, conditions={"segmentation": wide + 5}, seed=0, output="tensor")
    assert (other - out).abs().max() > 1e-4


def test_bad_conditions_are_refused(run):
    pipe = latentdiff.load(run)
    seg = torch.zeros(1, 16, 16, dtype=torch.long)
    with pytest.raises(RequestError, match="give conditions"):
        pipe.sample(1)
    with pytest.raises(RequestError, match="unknown \\['mask'\\]"):
        pipe.sample(1, conditions={"segmentation": seg, "mask": seg})
    with pytest.raises(RequestError, match="3 rows; expected 1 .* or 2"):
        pipe.sample(2, conditions={"segmentation": seg.expand(3, -1, -1)})
    with pytest.raises(ConfigError, match="segmentation alone"):
        pipe.sample(1, conditions={"segmentation": seg}, guidance=2.0)


def test_config_checks(tmp_path):
    bad = TEXT.replace("mode: concat, concat: segmentation", "mode: concat")
    (tmp_path / "c.yaml").write_text(bad)
    with pytest.raises(ConfigError, match="set it for mode concat"):
        Pipeline.from_config(load_config(tmp_path / "c.yaml"))


def test_a_rescaler_off_the_diffusion_grid_is_a_config_error_before_anything_is_written(tmp_path):
    # Pixel space: the U-Net runs at 16x16, and a rescaler that halves the map would give it 8x8.
    bad = TEXT.replace("concat_options: {classes: 21}", "concat_options: {classes: 21}, rescaler: {n_stages: 1}")
    (tmp_path / "c.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=r"reaches the U-Net at 8x8 but the diffusion runs at 16x16.*rescaler"):
        train_from_config(load_config(tmp_path / "c.yaml"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
