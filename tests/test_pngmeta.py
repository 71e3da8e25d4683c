"""PNG generation parameters (pngmeta.py): round trip, clear errors, atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from latentdiff.pngmeta import format_params, read_png_params, save_png, summary

PARAMS = {"prompt": "a red circle at the top left — «rouge» 赤い円 🟥",
          "negative_prompt": "blurry, two objects", "seed": 7, "sampler": "dpmpp_2m", "steps": 20, "guidance": 3.5,
          "model": "runs/shapes_ldm_txt2img",
          "size": [32, 48], "class": None, "extra": {"eta": 0.0, "tags": ["a", "b"]}}


def image(w=48, h=32):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_round_trip_with_unicode(tmp_path):
    im = image()
    path = save_png(im, tmp_path / "out" / "img.png", PARAMS)
    assert path == tmp_path / "out" / "img.png"
    assert read_png_params(path) == PARAMS
    with Image.open(path) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(im))
        text = back.text
    assert text["parameters"] == summary(PARAMS, (48, 32))
    prompt, negative, pairs = text["parameters"].split("\n")
    assert prompt == PARAMS["prompt"] and negative == "Negative prompt: blurry, two objects"
    assert pairs.startswith("Steps: 20, Sampler: dpmpp_2m, CFG scale: 3.5, Seed: 7, Size: 48x32, "
                            "Model: runs/shapes_ldm_txt2img")
    assert 'Extra: {"eta": 0.0, "tags": ["a", "b"]}' in pairs and "Class: null" in pairs
    assert os.listdir(tmp_path / "out") == ["img.png"]


def test_format_params_lists_every_parameter_prompt_first():
    text = format_params({"seed": 0, "prompt": "a blue square", "guidance": 3})
    lines = text.splitlines()
    assert lines[0].split() == ["prompt", "a", "blue", "square"]
    assert [line.split()[0] for line in lines] == ["prompt", "seed", "guidance"] and lines[2].endswith("3")
    assert format_params({}) == "(no parameters)"


def test_not_a_png_is_named(tmp_path):
    jpeg, junk = tmp_path / "photo.jpg", tmp_path / "notes.png"
    image().save(jpeg, format="JPEG")
    junk.write_text("hello")
    with pytest.raises(ValueError, match="photo.jpg is a JPEG image, not a PNG"):
        read_png_params(jpeg)
    with pytest.raises(ValueError, match="notes.png is not a readable PNG"):
        read_png_params(junk)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_png_params(tmp_path / "missing.png")


def test_png_without_metadata_is_named(tmp_path):
    plain = tmp_path / "plain.png"
    image().save(plain)
    with pytest.raises(ValueError, match="plain.png has no latentdiff metadata"):
        read_png_params(plain)


def test_bad_params_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="'seed' is not JSON-able"):
        save_png(image(), tmp_path / "x.png", {"seed": object()})
    with pytest.raises(TypeError, match="'guidance' is not JSON-able"):
        save_png(image(), tmp_path / "x.png", {"guidance": float("nan")})
    with pytest.raises(TypeError, match="must be a dict"):
        save_png(image(), tmp_path / "x.png", ["prompt"])
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    save_png(image(), path, {"seed": 1})
    before = path.read_bytes()
    im = image()
    real_save = Image.Image.save

    def half_then_fail(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as fh:
            fh.truncate(50)
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_png(im, path, {"seed": 2})
    with pytest.raises(OSError, match="disk full"):
        save_png(im, tmp_path / "new.png", {"seed": 3})
    assert os.listdir(tmp_path) == ["img.png"] and path.read_bytes() == before  # the old file is untouched
    monkeypatch.undo()
    assert read_png_params(path) == {"seed": 1}
