"""Prompt adherence on shapes (eval/adherence.py) and the first stage's ceiling (eval/ceiling.py)."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from latentdiff.data.shapes import (
    Scene,
    ShapesConfig,
    ShapesDataset,
    caption,
    scene_at,
    scene_split,
    scene_targets,
)
from latentdiff.eval.adherence import (
    adherence_report,
    cells_caption,
    evaluate_adherence,
    format_adherence,
    heldout_prompts,
    parse_caption,
    parse_objects,
    read_cells,
    real_images,
    score,
)
from latentdiff.eval.ceiling import equal_size_precision_recall, format_ceiling, reconstruction_ceiling
from latentdiff.eval.shapes_oracle import ShapesOracle, ShapesOracleConfig, shapes_arrays

from helpers.oracles import RuleOracle

# Rendered at 60 px (20 px cells) with 2x supersampling, the rule reader below reads every held-out scene right.
WORLD = {"size": 60, "antialias": 2}


class LogitStub(nn.Module):
    """Returns the logits it is given, one image after the other (one-hot of the cells it should read)."""

    def __init__(self, cells, num_classes):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.as_tensor(cells), 1 + num_classes).float()
        self.num_classes, self.pos = num_classes, 0

    def cell_logits(self, x):
        out = self.logits[self.pos:self.pos + len(x)]
        self.pos += len(x)
        return out


def cells_of(cases):
    return torch.stack([c.cells for c in cases])


def render(scene, cfg):
    from latentdiff.data.shapes import render_scene
    img = render_scene(scene, cfg.size, cfg.antialias)[0]
    return torch.from_numpy(img).permute(2, 0, 1).float()[None] / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("backgrounds", [("black",), ("black", "grey", "white")])
def test_parse_caption_inverts_caption_on_both_splits(backgrounds):
    cfg = ShapesConfig(min_objects=1, max_objects=9, backgrounds=backgrounds)
    with_bg = len(backgrounds) > 1
    seen_bg = set()
    for split in ("train", "test"):
        for i in range(150):
            scene = scene_at(7, i, split, cfg)
            text = caption(scene, with_background=with_bg)
            want = scene_targets(scene, cfg)["cells"]
            assert torch.equal(parse_caption(text, cfg), want), text
            assert cells_caption(want, cfg) == caption(scene)  # and back, without the background phrase
            objects, bg = parse_objects(text, cfg)
            assert [(o.shape, o.colour, o.cell) for o in scene.objects] == objects
            assert bg == (scene.background if with_bg else None)
            seen_bg.add(bg)
    assert len(seen_bg) == (3 if with_bg else 1)
    # The dataset's own captions (with the background phrase when it has several) parse to its targets.
    ds = ShapesDataset("test", length=20, seed=1, config=cfg)
    for i in range(20):
        item = ds[i]
        assert torch.equal(parse_caption(item["caption"], cfg), item["cells"])


def test_parse_caption_accepts_variants_and_subsets_of_classes():
    cfg = ShapesConfig()
    want = torch.zeros(9, dtype=torch.long)
    want[0], want[4] = 1 + cfg.class_id("circle", "orange"), 1 + cfg.class_id("square", "blue")
    for text in ("a orange circle at the top left and a blue square in the centre",
                 "An  orange circle at the top left, and a blue square in the centre.",
                 "a blue square in the centre, an orange circle at the top left"):
        assert torch.equal(parse_caption(text, cfg), want), text
    # Class ids follow the configuration's order of shapes and colours.
    small = ShapesConfig(shapes=("square", "circle"), colours=("blue", "orange"))
    got = parse_caption("a orange circle at the top left and a blue square in the centre", small)
    assert got[0] == 1 + 1 * 2 + 1 and got[4] == 1 + 0 and got.count_nonzero() == 2


@pytest.mark.parametrize("text, named", [
    ("", "empty"),
    ("a red circle at the top left and", "at the top left and"),
    ("a red circle at the top left and two blue squares", "two blue squares"),
    ("a magenta circle in the centre", "magenta"),
    ("a red hexagon in the centre", "hexagon"),
    ("a red circle in the middle", "in the middle"),
    ("a red circle in the centre and a blue square in the centre", "share the cell"),
    ("a red circle in the centre on a pink background", "pink"),
    ("a red circle in the centre on a grey background", "grey"),  # the config has only black
])
def test_parse_caption_names_what_it_cannot_parse(text, named):
    with pytest.raises(ValueError, match=named):
        parse_caption(text, ShapesConfig())


def test_parse_caption_rejects_classes_outside_the_configuration():
    with pytest.raises(ValueError, match="unknown colour 'red'.*blue, green"):
        parse_caption("a red circle in the centre", ShapesConfig(colours=("blue", "green")))
    with pytest.raises(ValueError, match=r"cells must be 9 values in \[0, 21\]"):
        cells_caption(torch.full((9,), 22), ShapesConfig())


# ---------------------------------------------------------------------------------------------- held-out prompts

def test_heldout_prompts_are_test_split_layouts_balanced_and_deterministic():
    cases = heldout_prompts(10, seed=3)
    assert [c.num_objects for c in cases] == [1] * 4 + [2] * 3 + [3] * 3
    assert [c.tag for c in cases] == ["one object"] * 4 + ["two objects"] * 3 + ["three objects"] * 3
    cfg = ShapesConfig()
    train_keys = {scene_at(3, i, "train", cfg).layout_key() for i in range(1500)}
    for c in cases:
        assert scene_split(c.scene, cfg.test_fraction) == "test"  # the dataset's split rule: never in training
        assert c.scene.layout_key() not in train_keys
        assert len(c.scene.objects) == c.num_objects
        assert torch.equal(parse_caption(c.prompt, cfg), c.cells)
    # Deterministic, and a larger request extends each object count's list.
    again, more = heldout_prompts(10, seed=3), heldout_prompts(30, seed=3)
    assert [c.prompt for c in again] == [c.prompt for c in cases]
    assert [c.prompt for c in more if c.num_objects == 2][:3] == [c.prompt for c in cases if c.num_objects == 2]
    assert len({c.prompt for c in more}) == 30  # distinct prompts (sizes are not in the prompt)
    assert len({c.prompt for c in heldout_prompts(60, max_objects=1, unique=False)}) < 60
    # 111 of the 189 one-object prompts have a test-split layout (some size); asking for more is an error.
    assert len({c.prompt for c in heldout_prompts(111, max_objects=1)}) == 111
    with pytest.raises(ValueError, match="only 111 distinct one object prompts"):
        heldout_prompts(112, max_objects=1)
    assert [c.prompt for c in heldout_prompts(10, seed=4)] != [c.prompt for c in cases]
    # Fewer prompts than object counts: the first counts get them.
    assert [c.num_objects for c in heldout_prompts(2, min_objects=2, max_objects=4)] == [2, 3]
    with pytest.raises(ValueError, match="num must be a positive int"):
        heldout_prompts(0)
    with pytest.raises(ValueError, match="min_objects"):
        heldout_prompts(5, min_objects=0)


def test_real_images_are_the_test_split_images_of_the_prompts():
    cases = heldout_prompts(6, seed=2, min_objects=1, max_objects=2, backgrounds=("black", "white"))
    x = real_images(cases)
    assert x.shape == (6, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    for j, c in enumerate(cases):
        ds = ShapesDataset("test", length=3, seed=2, min_objects=c.num_objects, max_objects=c.num_objects,
                           backgrounds=("black", "white"))
        item = ds[j % 3]
        assert item["caption"] == c.prompt and c.prompt.endswith(" background")
        assert torch.equal(item["image"], x[j]) and torch.equal(item["cells"], c.cells)
    assert real_images(cases[:2], size=12).shape == (2, 3, 12, 12)


# ---------------------------------------------------------------------------------------------- scoring

def test_score_passes_real_images_and_fails_one_wrong_object():
    cases = heldout_prompts(60, seed=0, **WORLD)
    oracle, cells = RuleOracle(cases[0].config), cells_of(cases)
    assert score(oracle, real_images(cases), cells).all()  # the rule reader is right on every real image

    cfg = cases[0].config
    three = [c for c in cases if c.num_objects == 3][:6]
    for c in three:
        objs = list(c.scene.objects)
        empty = next(k for k in range(9) if all(o.cell != k for o in objs))
        colour = next(n for n in cfg.colours if n != objs[1].colour)
        shape = next(n for n in cfg.shapes if n != objs[1].shape)
        variants = {
            "removed": objs[:1] + objs[2:],
            "added": objs + [dataclasses.replace(objs[0], cell=empty)],
            "recoloured": [objs[0], dataclasses.replace(objs[1], colour=colour)] + objs[2:],
            "reshaped": [objs[0], dataclasses.replace(objs[1], shape=shape)] + objs[2:],
            "moved": [objs[0], dataclasses.replace(objs[1], cell=empty)] + objs[2:],
        }
        bg = c.scene.background
        scenes = [c.scene] + [Scene(tuple(sorted(v, key=lambda o: o.cell)), bg) for v in variants.values()]
        x = torch.cat([render(s, cfg) for s in scenes])
        passes = score(oracle, x, c.cells.expand(len(x), 9))
        assert passes.tolist() == [True] + [False] * len(variants), (c.prompt, dict(zip(variants, passes[1:].tolist())))


def test_score_compares_all_nine_cells_of_the_oracles_reading():
    target = torch.tensor([[0, 3, 0, 0, 5, 0, 0, 0, 0]] * 4)
    read = target.clone()
    read[1, 1] = 4   # another class in an asked cell
    read[2, 8] = 1   # an extra object
    read[3, 4] = 0   # a missing object
    stub = LogitStub(read, num_classes=21)
    assert score(stub, torch.zeros(4, 3, 8, 8), target, batch_size=3).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"cells must be \(N, 9\)"):
        score(stub, torch.zeros(4, 3, 8, 8), target[:, :8])
    with pytest.raises(ValueError, match="3 images for 4 prompts"):
        score(stub, torch.zeros(3, 3, 8, 8), target)
    with pytest.raises(ValueError, match=r"in \[0, 21\]"):
        score(stub, torch.zeros(4, 3, 8, 8), target + 20)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        score(stub, torch.zeros(4, 1, 8, 8), target)
    with pytest.raises(ValueError, match="NaN"):
        score(stub, torch.full((4, 3, 8, 8), float("nan")), target)


def test_read_cells_uses_the_shapes_oracle_in_eval_mode_on_its_device():
    oracle = ShapesOracle(ShapesOracleConfig(widths=(4, 4, 4), cell_dim=8)).train()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    got = read_cells(oracle, x, batch_size=2)
    assert oracle.training  # restored
    oracle.eval()
    assert torch.equal(got, oracle.read_cells(torch.round((x + 1) * 127.5) / 127.5 - 1))


# ---------------------------------------------------------------------------------------------- reports

def test_adherence_report_aggregates_per_tag_and_overall():
    cases = heldout_prompts(9)
    passes = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    r = adherence_report(passes, cases)
    assert list(r) == ["one object", "two objects", "three objects", "overall"]
    assert r["one object"] == {"rate": 2 / 3, "passed": 2, "count": 3}
    assert r["two objects"] == {"rate": 1 / 3, "passed": 1, "count": 3}
    assert r["three objects"] == {"rate": 0.0, "passed": 0, "count": 3}
    assert r["overall"] == {"rate": 3 / 9, "passed": 3, "count": 9}
    real = adherence_report(torch.ones(9, dtype=torch.bool), cases)
    table = format_adherence(r, real)
    lines = table.splitlines()
    assert "real images (oracle ceiling)" in lines[0] and len(lines) == 6
    assert lines[2].startswith("one object") and "66.7% (2/3)" in lines[2] and "100.0% (3/3)" in lines[2]
    assert lines[-1].startswith("overall") and "33.3% (3/9)" in lines[-1]
    assert "-" in format_adherence(r).splitlines()[2].split(")")[-1]  # no real report: a dash
    with pytest.raises(ValueError, match="8 scores for 9 cases"):
        adherence_report(passes[:8], cases)


# ---------------------------------------------------------------------------------------------- end to end

def test_evaluate_adherence_scores_a_generator_and_the_real_images():
    cases = heldout_prompts(12, seed=1, **WORLD)
    by_prompt = {c.prompt: c for c in cases}
    oracle, calls = RuleOracle(cases[0].config), []

    def forgetful(prompts, seeds):  # draws the prompt's scene but forgets every object after the first
        calls.append((list(prompts), list(seeds)))
        out = []
        for p in prompts:
            scene = by_prompt[p].scene
            out.append(render(Scene(scene.objects[:1], scene.background), by_prompt[p].config))
        return torch.cat(out)

    result = evaluate_adherence(forgetful, oracle, cases, batch_size=5, seed=100)
    assert [len(p) for p, _ in calls] == [5, 5, 2]
    assert sum((s for _, s in calls), []) == list(range(100, 112))
    assert result["model"]["one object"]["rate"] == 1.0
    assert result["model"]["two objects"]["rate"] == 0.0 and result["model"]["three objects"]["rate"] == 0.0
    assert result["model"]["overall"] == {"rate": 4 / 12, "passed": 4, "count": 12}
    assert all(v["rate"] == 1.0 for v in result["real"].values())
    first = next(r for r in result["cases"] if r["tag"] == "two objects")
    assert not first["passed"] and first["real_passed"] and first["prompt"].startswith(first["read"])
    assert first["read"] and " and " not in first["read"]

    with pytest.raises(ValueError, match=r"generate returned \(2, 3, 60\) for 5 prompts"):
        evaluate_adherence(lambda p, s: torch.zeros(2, 3, 60), oracle, cases, batch_size=5)


def test_evaluate_adherence_refuses_an_oracle_with_other_classes():
    cases = heldout_prompts(3)
    other = ShapesOracle(ShapesOracleConfig(colours=("blue", "red"), widths=(2, 2, 2), cell_dim=4))
    with pytest.raises(ValueError, match="class ids differ"):
        evaluate_adherence(lambda p, s: torch.zeros(len(p), 3, 32, 32), other, cases)


# ---------------------------------------------------------------------------------------------- ceiling

class Identity(nn.Module):
    """An autoencoder that reconstructs perfectly (the ceiling is then the identity's)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def encode(self, x, sample=False, generator=None):
        return x

    def decode(self, z):
        return z


def test_reconstruction_ceiling_of_a_perfect_and_of_a_random_autoencoder():
    from latentdiff.nn.autoencoder import Autoencoder, config_for_factor

    oracle = ShapesOracle(ShapesOracleConfig(widths=(4, 4, 8), cell_dim=4)).eval()
    x, cells = shapes_arrays("test", 24, seed=0)
    other = shapes_arrays("test", 24, seed=1)[0]
    perfect = reconstruction_ceiling(Identity(), oracle, x, other_images=other, cells=cells, batch_size=10)
    assert abs(perfect["ceiling"]["fid"]) < 1e-6
    assert perfect["ceiling"]["precision"] == 1.0 and perfect["ceiling"]["recall"] == 1.0
    assert perfect["exact"] == 1.0 and perfect["floor"]["fid"] > 0 and perfect["floor"]["n"] == 24
    ev = perfect["exact_vs_targets"]
    assert ev["originals"] == ev["reconstructions"]

    torch.manual_seed(0)
    ae = Autoencoder(config_for_factor(4, ch=8, ch_mult=(1, 1, 1), num_res_blocks=1, norm_groups=4)).eval()
    rough = reconstruction_ceiling(ae, oracle, x, batch_size=10)
    assert rough["floor"] is None and rough["ceiling"]["fid"] > perfect["floor"]["fid"]
    assert rough["ceiling"]["precision"] < 1.0
    table = format_ceiling(perfect)
    assert "reconstructions (ceiling)" in table and "oracle reads the same scene" in table
    with pytest.raises(ValueError, match=r"cells must be \(24, 9\)"):
        reconstruction_ceiling(Identity(), oracle, x, cells=cells[:3])
    with pytest.raises(ValueError, match="N > k = 3"):
        reconstruction_ceiling(Identity(), oracle, x[:3])


def test_equal_size_precision_recall_cuts_the_reference_to_the_sample_count():
    from latentdiff.eval.metrics import precision_recall

    # A finite world: 25 lattice points, the reference holds each 16 times (tiny jitter); the "samples" are
    # lattice points moved by a fifth of the spacing (as a blur moves an image a little).
    rng = np.random.default_rng(0)
    lattice = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0)), -1).reshape(-1, 2)
    real = np.repeat(lattice, 16, axis=0) + 0.01 * rng.standard_normal((400, 2))
    fake = lattice[rng.integers(0, 25, 50)] + 0.2
    got = equal_size_precision_recall(real, fake, k=3, seed=1)
    idx = np.sort(np.random.default_rng(1).choice(400, 50, replace=False))
    assert got == precision_recall(real[idx], fake, k=3)
    # Against all 400, the k-NN balls shrink to the jitter and no sample is "precise"; at equal size they
    # reach the neighbouring lattice points.
    assert precision_recall(real, fake, k=3)[0] == 0.0 and got[0] > 0.9
    assert equal_size_precision_recall(real[:20], fake, k=3) == precision_recall(real[:20], fake, k=3)
