"""Semantic synthesis (LDM sec. 4.3.2): a tiny pixel-space model conditioned on segmentation maps through the
SpatialRescaler trains a few steps, samples through `latentdiff sample --segmentation` at the training size and
at 64x128 (the map implies the size), reads back the palette maps it writes, and is scored by `latentdiff eval
--metrics miou` at two sizes; bad maps are one-line errors with nothing written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.config import load_config
from latentdiff.data.shapes import ShapesConfig
from latentdiff.errors import RequestError
from latentdiff.segmaps import palette, read_map, write_map
from latentdiff.train.run import train_from_config

from helpers.clitools import captured, run_cli

CFG = ShapesConfig()
TEXT = """
model: {preset: tiny}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: shapes, size: 16, options: {length: 32, mosaic: 2}}   # crops of 2x2 mosaics, as the recipe
conditioning: {kind: null, mode: concat, concat: segmentation, concat_options: {classes: 21},
               rescaler: {n_stages: 0, out_channels: 4}}
train: {steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.0, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no"}
sample: {sampler: ddim, steps: 2, guidance: 1.0, num: 2, batch_size: 2}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("semantic")
    (folder / "c.yaml").write_text(TEXT)
    torch.set_num_threads(1)
    train_from_config(load_config(folder / "c.yaml"), folder / "run", progress=False)
    return folder / "run"


def _map(h, w):
    seg = torch.zeros(h, w, dtype=torch.long)
    seg[2:8, 2:8] = 1
    seg[h - 8 : h - 2, w - 8 : w - 2] = 17
    return seg


def test_maps_round_trip_as_palette_grey_and_rgb_png(tmp_path):
    seg = _map(16, 32)
    assert len({tuple(c) for c in palette(CFG)}) == 1 + CFG.num_classes  # every class its own colour
    write_map(tmp_path / "p.png", seg, CFG)
    assert torch.equal(read_map(tmp_path / "p.png", CFG)[0], seg)
    Image.fromarray(seg.numpy().astype(np.uint8), mode="L").save(tmp_path / "l.png")
    assert torch.equal(read_map(tmp_path / "l.png", CFG)[0], seg)
    Image.open(tmp_path / "p.png").convert("RGB").save(tmp_path / "rgb.png")
    assert torch.equal(read_map(tmp_path / "rgb.png", CFG)[0], seg)
    rgb = np.asarray(Image.open(tmp_path / "rgb.png")).copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "off.png")
    with pytest.raises(RequestError, match=r"colour \(1, 2, 3\) at row 0, column 0"):
        read_map(tmp_path / "off.png", CFG)


def test_command_samples_a_map_at_two_sizes_beside_it(run, tmp_path, capsys):
    for h, w in ((16, 16), (64, 128)):
        write_map(tmp_path / f"map{h}.png", _map(h, w), CFG)
        out = tmp_path / f"grid{h}.png"
        rc, stdout, err = run_cli(capsys, "sample", run, "--segmentation", tmp_path / f"map{h}.png", "--num", "2",
                                  "--out", out, "--quiet")
        assert rc == 0, err
        assert Image.open(out).size == (3 * (w + 2) + 2, h + 4)  # the map, then two samples of its size
        # The map written beside the grid is read back by --segmentation as the same map.
        assert torch.equal(read_map(out.with_suffix(".map.png"), CFG)[0], _map(h, w))
    rc, _, err = run_cli(capsys, "sample", run, "--segmentation", tmp_path / "grid16.map.png", "--num", "1",
                         "--out", tmp_path / "again.png", "--quiet")
    assert rc == 0, err


@pytest.mark.parametrize("make, message", [
    (lambda: _map(16, 16) + 10, "class id(s) [27]"),
    (lambda: _map(18, 17), "not divisible by"),  # the tiny U-Net downsamples by 2
])
def test_command_refuses_bad_maps(run, tmp_path, make, message):
    Image.fromarray(make().numpy().astype(np.uint8), mode="L").save(tmp_path / "bad.png")
    out = tmp_path / "out.png"
    rc, stdout, err = captured("sample", run, "--segmentation", tmp_path / "bad.png", "--out", out, "--quiet")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]


def test_command_refuses_the_wrong_input(run, tmp_path, capsys):
    write_map(tmp_path / "m.png", _map(16, 16), CFG)
    rc, _, err = run_cli(capsys, "sample", run, "--layout", tmp_path / "m.png", "--out", tmp_path / "o.png")
    assert rc == 2 and "--layout is for layout models" in err
    rc, _, err = run_cli(capsys, "sample", run, "--out", tmp_path / "o.png")
    assert rc == 2 and "give --segmentation FILE" in err
    rc, _, err = run_cli(capsys, "sample", run, "--segmentation", tmp_path / "m.png", "--size", "32x32",
                         "--out", tmp_path / "o.png")
    assert rc == 2 and "differs from the map's 16x16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_command_evaluates_miou_at_two_sizes(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", run, "--metrics", "miou", "--num", "2", "--size", "16x16,32x64",
                              "--out", out, "--quiet")
    assert rc == 0, err
    assert "| 16x16 |" in stdout and "| 32x64 |" in stdout
    result = json.loads(out.read_text())
    assert set(result["miou"]) == {"16x16", "32x64"}
    assert 0.0 <= result["miou"]["32x64"]["model"]["miou"] <= 1.0
    rc, _, err = run_cli(capsys, "eval", run, "--metrics", "miou", "--num", "2", "--size", "24x24")
    assert rc == 2 and "multiples of 16" in err
