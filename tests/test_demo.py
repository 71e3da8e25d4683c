"""`make demo` end to end at toy size: both trainings, the grid with its parameters, the adherence table and
summary.json. The shapes oracle is not trained: a tiny untrained one sits in the test's LATENTDIFF_CACHE."""

import json

from latentdiff import demo
from latentdiff.eval.shapes_oracle import save_shapes_oracle
from latentdiff.pngmeta import read_png_params

from helpers.oracles import RuleShapesOracle


def test_demo_trains_draws_and_scores_at_toy_size(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENTDIFF_CACHE", str(cache))
    save_shapes_oracle(RuleShapesOracle(seed=1), cache / "oracles" / "shapes")
    out = tmp_path / "demo"
    first_stage = ["train.steps=2", "train.batch_size=4", "eval_num=4"]
    rc = demo.main(["--out", str(out), "--processes", "1", "--threads", "1", "--per-tag", "2", "--grid-per-tag", "1",
                    "--seeds", "2", *[a for o in first_stage for a in ("--first-stage", o)],
                    "train.steps=2", "train.batch_size=8", "latent.cache_pool=32", "sample.steps=2"])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    tags = ("one object", "two objects", "three objects", "overall")
    assert all(t in summary["adherence"]["model"] and t in summary["adherence"]["real_images"] for t in tags)
    assert summary["adherence"]["model"]["overall"]["count"] == 6
    assert set(summary["fid"]) == {"model", "floor", "ceiling"} and summary["guidance"] == 2.0
    params = read_png_params(out / "txt2img_grid.png")  # rows: three distinct held-out prompts
    assert len(params["prompt"]) == 3 and len(set(params["prompt"])) == 3 and params["seeds"] == [0, 1]
    assert "prompts of compositions never seen in training" in printed and "overall" in printed
    assert (out / "run" / "tokenizer.json").is_file() and (out / "first_stage" / "autoencoder").is_dir()
