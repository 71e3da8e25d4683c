"""Layout-to-image (LDM sec. 4.3.1): the box tokenizer, the layout conditioner, and a tiny pixel-space layout model
trained a few steps, sampled through `latentdiff sample --layout` at the training size and at 64x128, scored by
`latentdiff eval --metrics layout`; every bad layout is a one-line error with nothing written."""

import json

import pytest
import torch

import latentdiff
from latentdiff.config import load_config
from latentdiff.data.shapes import ShapesConfig, ShapesDataset
from latentdiff.errors import RequestError
from latentdiff.layouts import parse_layout, parse_layouts
from latentdiff.nn.conditioners import build_conditioner
from latentdiff.nn.layout_encoder import LayoutEncoderConfig, layout_tokens
from latentdiff.train.run import train_from_config

from helpers.clitools import captured, run_cli

CFG = ShapesConfig()
TEXT = """
model: {preset: tiny}
diffusion: {schedule: cosine, num_steps: 50}
data: {name: shapes, size: 16, options: {length: 32, max_objects: 3}}
conditioning: {kind: layout, mode: crossattn, num_classes: 21, layout: {max_objects: 3, grid: 8, width: 16, depth: 1,
               heads: 2}}
train: {steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.5, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no"}
sample: {sampler: ddim, steps: 2, guidance: 2.0, num: 2, batch_size: 2}
"""
RED_CIRCLE = {"shape": "circle", "colour": "red", "box": [0.1, 0.1, 0.4, 0.4]}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "box": [0.5, 0.5, 0.9, 0.9]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layout")
    (folder / "c.yaml").write_text(TEXT)
    torch.set_num_threads(1)
    train_from_config(load_config(folder / "c.yaml"), folder / "run", progress=False)
    return folder / "run"


def test_tokens_of_a_layout():
    cfg = LayoutEncoderConfig(num_classes=21, max_objects=3, grid=32)
    layout = torch.tensor([[[5.0, 0.5, 0.25, 1.0, 0.5], [2.0, 0.0, 0.0, 0.1, 0.1], [-1, 0, 0, 0, 0]]])
    tokens = layout_tokens(layout, cfg)
    c = 1 + 21  # first corner token
    # Reading order: the object at the top left first; the empty slot is three "none" tokens (0).
    assert tokens.tolist() == [[1 + 2, c + 0, c + 3 * 32 + 3, 1 + 5, c + 8 * 32 + 16, c + 16 * 32 + 31, 0, 0, 0]]
    assert torch.equal(layout_tokens(layout[:, [1, 0, 2]], cfg), tokens)  # the order given does not matter
    assert cfg.vocab_size == 1 + 21 + 32 * 32 and int(tokens.max()) < cfg.vocab_size


def test_layout_conditioner_and_its_null():
    cond = build_conditioner({"mode": "crossattn", "kind": "layout",
                              "layout": {"num_classes": 21, "max_objects": 2, "width": 16, "heads": 2}})
    layout = parse_layouts([RED_CIRCLE, BLUE_SQUARE], CFG, 2)
    out = cond({"layout": layout})
    assert out["context"].shape == (1, 6, 16) and cond.unet_kwargs()["context_dim"] == 16
    null = cond.null_like({"layout": layout})["layout"]
    assert (null[..., 0] == -1).all()
    assert not torch.allclose(cond({"layout": null})["context"], out["context"])


def test_dataset_layout_field_matches_boxes():
    item = ShapesDataset("train", 4, size=16)[0]
    n = item["num_objects"]
    assert item["layout"].shape == (3, 5)
    assert torch.equal(item["layout"][:n, 1:], item["boxes"][:n]) and (item["layout"][n:, 0] == -1).all()


@pytest.mark.parametrize("objects, message", [
    ([{**RED_CIRCLE, "box": [0.1, 0.1, 1.2, 0.4]}], r"lies outside \[0, 1\]"),
    ([{**RED_CIRCLE, "box": [0.5, 0.1, 0.5, 0.4]}], "needs x0 < x1"),
    ([{**RED_CIRCLE, "shape": "hexagon"}], "unknown shape 'hexagon'"),
    ([{**RED_CIRCLE, "colour": "pink"}], "unknown colour 'pink'"),
    ([RED_CIRCLE] * 4, "has 4 objects; this model takes at most 3"),
    ([{"shape": "circle", "colour": "red"}], r"missing key\(s\) \['box'\]"),
])
def test_bad_layouts(objects, message):
    with pytest.raises(RequestError, match=message):
        parse_layout(objects, CFG, 3)


def test_python_api_samples_a_layout(run):
    pipe = latentdiff.load(run)
    assert pipe.conditioning == "layout" and pipe.max_objects == 3
    a = pipe.sample(2, layouts=[RED_CIRCLE, BLUE_SQUARE], seed=0, output="tensor")
    b = pipe.sample(2, layouts=[[RED_CIRCLE], [BLUE_SQUARE]], seed=0, output="tensor")
    # The layout reaches the network (its zero-initialised cross-attention output has moved a little in 2 steps).
    assert a.shape == b.shape == (2, 3, 16, 16) and not torch.equal(a, b)
    with pytest.raises(RequestError, match="give layouts"):
        pipe.sample(1)


def test_command_samples_at_two_sizes_with_the_layout_beside(run, tmp_path, capsys):
    (tmp_path / "layout.json").write_text(json.dumps([RED_CIRCLE, BLUE_SQUARE]))
    for size, shape in ((None, (16, 16)), ("64x128", (64, 128))):
        out = tmp_path / f"grid_{size}.png"
        extra = ["--size", size] if size else []
        rc, stdout, err = run_cli(capsys, "sample", run, "--layout", tmp_path / "layout.json", "--num", "2",
                                  "--out", out, "--quiet", *extra)
        assert rc == 0, err
        from PIL import Image

        h, w = shape
        assert Image.open(out).size == (3 * (w + 2) + 2, h + 4)  # the layout's picture, then two samples
    rc, _, err = run_cli(capsys, "sample", run, "--layout", tmp_path / "layout.json", "--num", "2",
                         "--out", tmp_path / "folder", "--quiet")
    assert rc == 0 and json.loads((tmp_path / "folder" / "layouts.json").read_text()) == [[RED_CIRCLE, BLUE_SQUARE]]


@pytest.mark.parametrize("content, message", [
    ("[{\"shape\": \"circle\", ", "is not valid JSON"),
    (json.dumps([{**RED_CIRCLE, "box": [-0.1, 0, 0.5, 0.5]}]), "outside [0, 1]"),
    (json.dumps([{**RED_CIRCLE, "box": [0.6, 0, 0.5, 0.5]}]), "x0 < x1"),
    (json.dumps([{**RED_CIRCLE, "shape": "star"}]), "unknown shape 'star'"),
    (json.dumps([{**RED_CIRCLE, "colour": "teal"}]), "unknown colour 'teal'"),
    (json.dumps([RED_CIRCLE] * 5), "at most 3"),
])
def test_command_refuses_bad_layout_files(run, tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    out = tmp_path / "out.png"
    rc, stdout, err = captured("sample", run, "--layout", tmp_path / "bad.json", "--out", out, "--quiet")
    assert rc == 2 and message in err.strip().splitlines()[-1] and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_command_evaluates_layout_adherence(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, stdout, err = run_cli(capsys, "eval", run, "--metrics", "layout", "--num", "2", "--out", out, "--quiet")
    assert rc == 0, err
    assert "adherence" in stdout and "overall" in stdout
    result = json.loads(out.read_text())
    # Scored beside the real images of the same held-out scenes (at 16x16 too small for the reader: the ceiling
    # at 32x32 is in test_tasks_metrics.py).
    assert result["kind"] == "layout" and result["layout"]["model"]["overall"]["count"] == 2
    assert set(result["layout"]["real_images"]) == set(result["layout"]["model"])
    rc, _, err = run_cli(capsys, "eval", run, "--metrics", "miou", "--num", "2")
    assert rc == 2 and "takes no map" in err


def test_corner_embeddings_start_as_fourier_features():
    from latentdiff.nn.layout_encoder import LayoutEncoder

    cfg = LayoutEncoderConfig(num_classes=21, max_objects=3, grid=32, width=16, heads=2)
    table = LayoutEncoder(cfg).transformer.token_embedding.weight.detach()[1 + 21:]  # (S², width)
    near = (table[5 * 32 + 5] - table[5 * 32 + 6]).norm()
    far = (table[5 * 32 + 5] - table[25 * 32 + 28]).norm()
    assert near < 0.25 * far  # neighbouring corners start alike, distant ones apart
    assert len({tuple(r.tolist()) for r in table}) == 32 * 32  # and every corner is its own


def test_factored_class_embeddings_share_an_attribute_and_are_checked():
    from latentdiff.nn.layout_encoder import LayoutEncoder

    torch.manual_seed(0)
    cfg = LayoutEncoderConfig(num_classes=21, max_objects=3, width=64, heads=2, class_factors=[3, 7])
    assert cfg.class_factors == (3, 7)
    table = LayoutEncoder(cfg).transformer.token_embedding.weight.detach()[1:22]  # classes 0..20 = shape·7 + colour
    red_circle, red_square, blue_circle, blue_square = table[0], table[7], table[2], table[9]
    # e_circle + f_red - (e_square + f_red) == e_circle + f_blue - (e_square + f_blue): attributes add up.
    assert torch.allclose(red_circle - red_square, blue_circle - blue_square, atol=1e-6)
    assert (red_circle - red_square).norm() < (red_circle - blue_square).norm()
    assert 0.01 < table.std() < 0.04  # the token table's scale
    plain = LayoutEncoder(LayoutEncoderConfig(num_classes=21, width=64, heads=2)).transformer.token_embedding.weight
    assert not torch.allclose(plain[1] - plain[8], plain[3] - plain[10], atol=1e-3)  # default: independent classes
    with pytest.raises(ValueError, match="class_factors must be two positive integers whose product is"):
        LayoutEncoderConfig(num_classes=21, class_factors=[3, 6])
