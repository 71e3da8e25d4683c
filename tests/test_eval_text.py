"""`latentdiff eval` of text models of the shapes world (prompt adherence on held-out prompts, FID / precision /
recall against the real images of those prompts), the first stage's ceiling of latent models, precision / recall
at equal sizes, and benchmarks/guidance_sweep.py.

The models are tiny and trained 2 steps; the first stage is an untrained KL-f4 autoencoder (32x32 -> 4x8x8, s = 0.5).
The shapes oracle is never trained here: a tiny untrained ShapesOracle sits in the test's LATENTDIFF_CACHE, and
where adherence must give figures other than 0 its cell reading is replaced by a rule reader (helpers.oracles). The
figures are recomputed through the library, so that the glue (prompts, seeds, sets, columns) is checked."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdiff
from latentdiff.config import load_config
from latentdiff.data.shapes import ShapesConfig, caption, scene_at, scene_split
from latentdiff.eval import feature_networks, split_stats
from latentdiff.eval import run as ev
from latentdiff.eval.adherence import adherence_report, heldout_prompts, real_images, rerendered, score
from latentdiff.eval.features import extract_stats
from latentdiff.eval.metrics import FeatureStats, fid_from_stats, precision_recall
from latentdiff.eval.shapes_oracle import save_shapes_oracle
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder
from latentdiff.train.run import train_from_config

from helpers.clitools import run_cli
from helpers.oracles import RuleShapesOracle

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"max_objects": 3, "split_by": "composition"}
TEXT = """
model: {preset: tiny}
diffusion: {schedule: scaled_linear, num_steps: 50}
data: {name: shapes, size: 32, options: {length: 64, max_objects: 3, split_by: composition}}
latent: {cache_pool: 16}
conditioning: {kind: text, vocab_pool: 64, context_length: 24, text: {width: 16, depth: 1, heads: 2}}
train: {steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.2, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no"}
sample: {sampler: ddim, steps: 2, guidance: 2.0, num: 2, batch_size: 4}
"""
CLASS = """
model: {preset: tiny, num_classes: 21}
diffusion: {schedule: scaled_linear, num_steps: 50}
data: {name: shapes, size: 32, options: {length: 64, max_objects: 1}}
latent: {cache_pool: 16}
train: {steps: 2, batch_size: 4, lr: 1.0e-3, ema_decay: 0.9, cond_drop_prob: 0.2, checkpoint_every: 2,
        sample_every: 0, log_every: 1, mixed_precision: "no"}
sample: {sampler: ddim, steps: 2, guidance: 2.0, num: 2, batch_size: 4}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache holding a tiny untrained shapes oracle (so none is trained), a tiny first stage, and a text
    and a class latent model of the shapes world, each trained 2 steps."""
    root = tmp_path_factory.mktemp("evaltext")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTDIFF_CACHE", str(root / "cache"))
        oracle = RuleShapesOracle(seed=1)
        save_shapes_oracle(oracle, root / "cache" / "oracles" / "shapes")
        torch.manual_seed(0)
        ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32,
                                           z_channels=4, embed_dim=4))
        save_autoencoder(ae, str(root / "kl_f4"), latent_scale=0.5)
        runs = {}
        for name, text in (("text", TEXT), ("class", CLASS)):
            (root / f"{name}.yaml").write_text(text)
            config = load_config(root / f"{name}.yaml", [f"latent.first_stage={root / 'kl_f4'}"])
            train_from_config(config, root / name, progress=False)
            runs[name] = root / name
        yield {"root": root, "cache": root / "cache", "oracle": oracle, **runs}


@pytest.fixture
def cache(env, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(env["cache"]))
    return env["cache"]


@pytest.fixture
def rule_oracle(env, monkeypatch):
    """Every oracle folder loads as the rule-reading tiny oracle (its features are the saved oracle's)."""
    monkeypatch.setattr(feature_networks, "load_any_oracle", lambda path, device=None: env["oracle"])
    return env["oracle"]


def table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table: first column -> the other columns (split on two or more spaces)."""
    import re

    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 3:
            rows[cells[0]] = cells[1:]
    return rows


def rate(entry) -> str:
    return f"{entry['rate']:.1%} ({entry['passed']}/{entry['count']})"


# ---------------------------------------------------------------------------------------------- text models

def test_text_model_adherence_fid_pr_beside_floor_and_ceiling(env, cache, rule_oracle, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "eval", env["text"], "--metrics", "adherence,fid,pr", "--num", 9, "--steps", 2,
                           "--seed", 3, "--oracle", tmp_path / "any", "--out", tmp_path / "r.json", "--quiet")
    assert rc == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["metrics_asked"] == ["adherence", "fid", "pr"] and r["sampling"]["guidance"] == 2.0
    assert r["prompts"]["counts"] == {"one object": 3, "two objects": 3, "three objects": 3}
    assert r["prompts"]["split_by"] == "composition" and r["reference"]["kind"] == "heldout-prompts"

    # The prompts: test-split compositions of the model's own world (never a training caption).
    cases = heldout_prompts(9, seed=3, size=32, unique=False, **WORLD)
    assert [c["prompt"] for c in r["adherence"]["cases"]] == [c.prompt for c in cases]
    cfg = ShapesConfig(**WORLD)
    train_captions = {caption(scene_at(0, i, "train", cfg)) for i in range(3000)}
    assert all(scene_split(c.scene, cfg.test_fraction, "composition") == "test" for c in cases)
    assert not {c.prompt for c in cases} & train_captions

    # Adherence recomputed: image i of prompt i with seed 3 + i; the real images of the prompts; their reconstructions.
    pipe = latentdiff.load(env["text"])
    images = pipe.sample(9, prompts=[c.prompt for c in cases], seed=3, steps=2, guidance=2.0, output="tensor")
    cells = torch.stack([c.cells for c in cases])
    real_x = real_images(cases)
    want = {"model": adherence_report(score(rule_oracle, images, cells), cases),
            "real": adherence_report(score(rule_oracle, real_x, cells), cases),
            "ceiling": adherence_report(score(rule_oracle, ev.reconstructions(pipe, real_x, seed=3), cells), cases)}
    for column, report in want.items():
        assert r["adherence"][column] == report, column
    assert r["adherence"]["real"]["overall"]["rate"] >= 0.6  # the rule reader reads most real 32 px scenes right
    rows = table(out)
    for tag in ("one object", "two objects", "three objects", "overall"):
        assert rows[f"adherence: {tag}"] == [rate(want[k][tag]) for k in ("model", "real", "ceiling")]

    # FID / precision / recall: samples vs the real images of their prompts; the floor: the same prompts drawn
    # again with other sizes and positions (seed 4); the ceiling: those images reconstructed by the first stage.
    others = rerendered(cases, seed=4)
    assert [c.prompt for c in others] == [c.prompt for c in cases]
    assert not torch.equal(real_images(others), real_x)
    real = extract_stats(rule_oracle, real_x)
    other = real_images(others)
    sets = {"model": images, "floor": other, "ceiling": ev.reconstructions(pipe, other, seed=4)}
    for column, x in sets.items():
        fake = extract_stats(rule_oracle, x)
        assert r[column]["fid"] == pytest.approx(fid_from_stats(real, fake), rel=1e-5, abs=1e-6), column
        p, rec = precision_recall(real.features, fake.features, k=3)  # equal sizes: nothing to cut
        assert (r[column]["precision"], r[column]["recall"]) == (pytest.approx(p), pytest.approx(rec)), column
    assert rows["metric"] == ["model", "real floor (9 vs 9)", "first-stage ceiling"]
    assert [float(v) for v in rows["FID"]] == [pytest.approx(r[k]["fid"], rel=1e-3) for k in sets]
    assert "real images of the held-out prompts (test), 9 images" in out and "split by composition" in out


def test_adherence_is_a_default_metric_of_a_text_model_of_shapes(env, cache, capsys):
    """No --metrics, no --oracle: adherence and the feature metrics, read by the oracle in the cache (not trained)."""
    stamp = (cache / "oracles" / "shapes" / "model.safetensors").stat().st_mtime_ns
    rc, out, err = run_cli(capsys, "eval", env["text"], "--num", 6, "--quiet")
    assert rc == 0, err
    path = env["text"] / "eval" / "eval_ddim_2_g2_oracle-shapes.json"
    r = json.loads(path.read_text())
    assert r["metrics_asked"] == ["adherence", "fid", "kid", "pr"]
    assert r["adherence"]["model"]["overall"]["count"] == 6 and "kid_mean" in r["ceiling"]
    assert "first use" not in out and (cache / "oracles" / "shapes" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "adherence: overall" in out and "KID x 1e3" in out and "first-stage ceiling" in out
    # Adherence alone: no feature network, the table has the adherence rows and their two columns of real images.
    rc, out, err = run_cli(capsys, "eval", env["text"], "--metrics", "adherence", "--num", 3, "--quiet")
    assert rc == 0, err
    rows = table(out)
    assert rows["metric"] == ["model", "real images", "first-stage ceiling"] and "FID" not in rows


def write_folder(root: Path):
    from PIL import Image

    root.mkdir(parents=True)
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220)] * 2):
        im = Image.new("RGB", (32, 32))
        im.paste(colour, (4, 4, 20, 20))
        im.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {'red' if i % 2 == 0 else 'blue'} square\n")


def test_adherence_is_refused_clearly_where_it_has_no_meaning(env, cache, capsys, tmp_path):
    write_folder(tmp_path / "images")
    config = load_config(env["root"] / "text.yaml", [f"latent.first_stage={env['root'] / 'kl_f4'}", "data.name=folder",
                                                     f"data.root={tmp_path / 'images'}", "data.options={}",
                                                     "latent.cache_pool=null", "train.steps=1",
                                                     "train.checkpoint_every=1", "sample.prompts=[a red square]"])
    train_from_config(config, tmp_path / "folder_run", progress=False)
    tiny = ROOT / "configs" / "tiny_test.yaml"
    train_from_config(load_config(tiny, ["train.steps=1", "train.checkpoint_every=1"]), tmp_path / "digits",
                      progress=False)
    cases = [
        (["eval", tmp_path / "folder_run", "--metrics", "adherence,fid"],
         ["adherence needs the shapes oracle", "'folder' data, not shapes"]),
        (["eval", tmp_path / "digits", "--metrics", "adherence"], ["this model is class-conditional"]),
        (["eval", env["text"], "--metrics", "bpd"], ["bpd", "text-conditioned"]),
        (["eval", "--real", tmp_path / "images", "--fake", tmp_path / "images", "--metrics", "adherence"],
         ["adherence needs a model"]),
    ]
    for args, messages in cases:
        rc, out, err = run_cli(capsys, *args, "--quiet")
        assert rc == 2, (args, out, err)
        assert all(m in err for m in messages), (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "folder_run" / "eval").exists() and not (tmp_path / "digits" / "eval").exists()
    # A held-out prompt longer than the model's context: said before any sampling.
    pipe = latentdiff.load(env["text"])
    pipe.conditioner.tokenizer.context_length = 8
    with pytest.raises(ValueError, match="held-out prompt .* does not fit its text encoder.*context length 8"):
        ev.evaluate_model(pipe, None, None, metrics=["adherence"], num=3, oracle=env["oracle"])
    # The folder text model keeps the feature metrics of other text models (its config's prompts).
    assert ev.default_metrics(latentdiff.load(tmp_path / "folder_run")) == list(ev.DEFAULT_METRICS)


# ---------------------------------------------------------------------------------------------- class models

def test_class_latent_model_gets_the_first_stage_ceiling_column(env, cache, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "eval", env["class"], "--metrics", "fid,pr", "--num", 8, "--seed", 5,
                           "--out", tmp_path / "c.json", "--quiet")
    assert rc == 0, err
    r = json.loads((tmp_path / "c.json").read_text())
    c = r["ceiling"]
    assert {"fid", "precision", "recall", "accuracy"} <= set(c) and c["n_fake"] == 8 and c["n_real"] == 64 - 8
    rows = table(out)
    assert rows["metric"][-1] == "first-stage ceiling"
    assert rows["class accuracy"][-1] == f"{c['accuracy']:.3g}" and "D(E(x))" in out
    # The floor with its second part of real images replaced by their reconstructions: recomputed.
    pipe, oracle = latentdiff.load(env["class"]), feature_networks.load_any_oracle(cache / "oracles" / "shapes")
    ref = ev.load_reference(None, oracle, pipe=pipe)
    part = np.random.default_rng(5).permutation(64)[:8]
    items = [ref.dataset[int(i)] for i in part]
    rec = ev.reconstructions(pipe, torch.stack([it["image"] for it in items]), seed=5)
    rest, _ = split_stats(ref.stats, 8, 5)
    want = ev.feature_metrics(rest, extract_stats(oracle, rec), ["fid", "pr"],
                              fake_labels=np.array([it["label"] for it in items]), seed=5)
    assert c == pytest.approx(want, rel=1e-6)
    # A statistics file keeps no images: no ceiling, said so.
    rc, out, err = run_cli(capsys, "eval", env["class"], "--metrics", "fid", "--num", 8, "--reference",
                           r["reference"]["stats_file"], "--out", tmp_path / "s.json", "--quiet")
    assert rc == 0, err
    assert "no first-stage ceiling" in out and json.loads((tmp_path / "s.json").read_text())["ceiling"] is None


def test_pixel_models_have_no_ceiling_column(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    from latentdiff.eval.oracle import Oracle, OracleConfig, save_oracle

    save_oracle(Oracle(OracleConfig()), tmp_path / "cache" / "oracles" / "digits")
    tiny = ROOT / "configs" / "tiny_test.yaml"
    train_from_config(load_config(tiny, ["train.steps=1", "train.checkpoint_every=1"]), tmp_path / "run",
                      progress=False)
    rc, out, err = run_cli(capsys, "eval", tmp_path / "run", "--metrics", "fid,pr", "--num", 8, "--steps", 2,
                           "--quiet")
    assert rc == 0, err
    assert "first-stage ceiling" not in out and "ceiling" not in json.loads(
        (tmp_path / "run" / "eval" / "eval_ddim_2_g1.5_oracle-digits.json").read_text())


# ---------------------------------------------------------------------------------------------- equal sizes

def test_precision_recall_at_equal_sizes_score_a_jitter_near_the_floor():
    """A finite world in feature space (20 scenes, each at 5 jitter levels) and a reference of 2,000 images: against
    all of it, the k-NN balls shrink to the copies of one jitter level, and samples moved by less than a jitter
    step (as a slight blur moves a correct image) are nowhere "precise". With the reference cut to the 200 samples
    they score near the floor, while samples off the world (visible damage) still score 0."""
    rng = np.random.default_rng(0)
    scenes = rng.normal(size=(20, 16)) * 3.0
    levels = rng.normal(size=(5, 16)) * 0.05  # the jitter levels of a scene

    def images(n, seed):
        g = np.random.default_rng(seed)
        return scenes[g.integers(0, 20, n)] + levels[g.integers(0, 5, n)] + 0.002 * g.normal(size=(n, 16))

    ref = FeatureStats.from_features(images(2000, 1))
    jittered = FeatureStats.from_features(images(200, 2) + 0.4 * 0.05 * rng.normal(size=(200, 16)))
    damaged = FeatureStats.from_features(images(200, 3) + 1.0 * rng.normal(size=(200, 16)))
    floor = ev.floor_metrics(ref, ["pr"], 200, seed=0)
    model = ev.feature_metrics(ref, jittered, ["pr"], seed=0)
    bad = ev.feature_metrics(ref, damaged, ["pr"], seed=0)
    assert model["pr_real"] == floor["pr_real"] == bad["pr_real"] == 200
    assert precision_recall(ref.features, jittered.features, k=3)[0] < 0.05  # the whole reference: "imprecise"
    assert floor["precision"] > 0.9 and floor["recall"] > 0.9
    assert model["precision"] > floor["precision"] - 0.1 and model["recall"] > floor["recall"] - 0.1
    assert bad["precision"] < 0.05
    # The same cut in evaluate.compare (the library's all-metrics call).
    from latentdiff.eval import compare

    assert compare(ref, jittered, kid_subsets=2, kid_subset_size=50)["precision"] == model["precision"]


# ---------------------------------------------------------------------------------------------- guidance sweep

def _sweep():
    spec = importlib.util.spec_from_file_location("guidance_sweep", ROOT / "benchmarks" / "guidance_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guidance_sweep_tables_a_text_and_a_class_model(env, cache, rule_oracle, capsys, tmp_path):
    sweep = _sweep()
    assert sweep.parse_scales("1, 2,3.5") == [1.0, 2.0, 3.5]
    rc = sweep.main([str(env["text"]), "--guidance", "1,3", "--num", "6", "--steps", "2", "--oracle",
                     str(tmp_path / "any"), "--out", str(tmp_path / "t.md"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    md = (tmp_path / "t.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| guidance | one object | two objects | three objects | overall | FID |")
    assert [ln.split("|")[1].strip() for ln in lines[1:]] == ["1", "3", "real images (floor)", "first-stage ceiling"]
    data = json.loads((tmp_path / "t.json").read_text())
    g3 = data["results"][1]
    one = ev.evaluate_model(latentdiff.load(env["text"]), rule_oracle, None, metrics=["adherence", "fid", "pr"],
                            num=6, steps=2, guidance=3.0, oracle=rule_oracle, net_info={"name": "oracle:shapes"})
    assert g3["adherence"] == one["adherence"]["model"] and g3["model"]["fid"] == pytest.approx(
        one["model"]["fid"], rel=1e-6)
    assert md.split("\n\n")[1] in out  # the table is printed
    rc = sweep.main([str(env["class"]), "--guidance", "1,2", "--num", "6", "--steps", "2", "--out",
                     str(tmp_path / "c.md"), "--quiet"])
    assert rc == 0
    head = (tmp_path / "c.md").read_text()
    assert "| guidance | class accuracy | FID | precision | recall |" in head and "first-stage ceiling" in head
    rc = sweep.main([str(tmp_path / "nowhere"), "--quiet"])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
