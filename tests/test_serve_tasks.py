"""`latentdiff serve` with the conditioning models of issues 13-14 (issue 16 follow-up): a layout model, a
super-resolution model ("low_res") and a model trained to inpaint ("image", "mask"), each trained a step or two
from a tiny config, through FastAPI's TestClient: GET /api/models describes the inputs each takes, POST
/api/generate (JSON or multipart) draws an image whose PNG records them, and a bad input is refused naming it."""

import io
import json
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import latentdiff
from latentdiff.config import load_config
from latentdiff.pngmeta import read_png_params
from latentdiff.serve import create_app, load_models
from latentdiff.train.run import train_from_config

TIMEOUT = 20.0
TRAIN = """
diffusion: {schedule: cosine, num_steps: 50}
train: {steps: 1, batch_size: 2, lr: 1.0e-3, ema_decay: 0.9, checkpoint_every: 1, sample_every: 0, log_every: 1,
        mixed_precision: "no"}
sample: {sampler: ddim, steps: 2, guidance: 1.0, num: 1, batch_size: 1}
"""
LAYOUT = TRAIN + """
model: {preset: tiny}
data: {name: shapes, size: 16, options: {length: 8, max_objects: 3}}
conditioning: {kind: layout, mode: crossattn, num_classes: 21, layout: {max_objects: 3, grid: 8, width: 16, depth: 1,
               heads: 2}}
"""
SR = TRAIN + """
model: {preset: tiny, channel_mult: [1, 2, 2]}
data: {name: shapes, size: 16, options: {length: 8}}
conditioning: {kind: null, mode: concat, concat: low_res, rescaler: {n_stages: 1, multiplier: 2, method: bicubic},
               concat_options: {factor: 2, noise_levels: 3, sample_level: 1}}
"""
INPAINT = TRAIN + """
model: {preset: tiny}
data: {name: shapes, size: 16, options: {length: 8}}
conditioning: {kind: null, mode: concat, concat: inpaint, concat_options: {latent_channels: 3}}
"""
RED_CIRCLE = {"shape": "circle", "colour": "red", "box": [0.1, 0.1, 0.4, 0.4]}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "box": [0.5, 0.5, 0.9, 0.9]}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One server with the three models, trained one step each."""
    root = tmp_path_factory.mktemp("servetasks")
    torch.set_num_threads(1)
    for name, text in (("layout", LAYOUT), ("sr", SR), ("inpaint", INPAINT)):
        (root / f"{name}.yaml").write_text(text)
        train_from_config(load_config(root / f"{name}.yaml"), root / name, progress=False)
    models = load_models([root / name for name in ("layout", "sr", "inpaint")])
    with TestClient(create_app(models, out_dir=root / "out")) as c:
        c.out = root / "out"
        yield c


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def generate(client, params, files=None):
    if files is None:
        return client.post("/api/generate", json=params)
    parts = {"params": (None, json.dumps(params)), **{k: (f"{k}.png", v, "image/png") for k, v in files.items()}}
    return client.post("/api/generate", files=parts)  # multipart, as the page sends it


def finished(client, response, tmp_path):
    """The job of an accepted request, waited for -> (its first image's pixels, the PNG's parameters)."""
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + TIMEOUT
    while (job := client.get(f"/api/jobs/{job_id}").json())["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert job["state"] == "done", job
    r = client.get(job["images"][0])
    assert r.status_code == 200
    path = tmp_path / "image.png"
    path.write_bytes(r.content)
    return np.asarray(Image.open(path)), read_png_params(path)


def detail(response) -> tuple[str, str]:
    """A 422's one error -> (the field it names, its message); a 400's -> ("", its message)."""
    if response.status_code == 400:
        return "", response.json()["detail"]
    assert response.status_code == 422, response.text
    (err,) = response.json()["detail"]
    return err["loc"][1], err["msg"]


def test_models_describe_the_inputs_of_each_task(client):
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    layout, sr, inpaint = models["layout"]["inputs"], models["sr"]["inputs"], models["inpaint"]["inputs"]
    assert layout["layout"] and layout["conditions"] == {} and not layout["prompt"] and not layout["classes"]
    assert layout["guidance"]  # trained with dropped layouts: guidance against the empty one applies
    assert set(models["layout"]["layout_vocabulary"]["shapes"]) >= {"circle", "square"}
    assert "red" in models["layout"]["layout_vocabulary"]["colours"]
    assert sr["conditions"] == {"low_res": "image"} and not sr["layout"] and sr["init_image"]
    assert inpaint["conditions"] == {} and inpaint["inpaint"] == "trained" and not inpaint["init_image"]
    assert not inpaint["layout"] and "layout_vocabulary" not in models["inpaint"]
    assert models["sr"]["size_multiple"] == 4 and models["sr"]["defaults"]["size"] == [16, 16]


def test_a_layout_request_is_drawn_and_recorded(client, tmp_path):
    r = generate(client, {"model": "layout", "layout": [RED_CIRCLE, BLUE_SQUARE], "seed": 3, "guidance": 2.0})
    pixels, params = finished(client, r, tmp_path)
    assert pixels.shape == (16, 16, 3)
    assert params["layout"] == [RED_CIRCLE, BLUE_SQUARE] and params["seed"] == 3 and params["guidance"] == 2.0
    # Multipart too (the page sends its params so when it uploads): the image the Python API draws for that layout.
    other, params = finished(client, generate(client, {"model": "layout", "layout": [BLUE_SQUARE], "seed": 3,
                                                       "guidance": 2.0}, files={}), tmp_path)
    pipe = latentdiff.load(params["model"])
    (want,) = pipe.sample(1, layouts=[[BLUE_SQUARE]], seed=3, guidance=2.0)
    assert params["layout"] == [BLUE_SQUARE] and np.array_equal(other, np.asarray(want))
    (red,) = pipe.sample(1, layouts=[[RED_CIRCLE, BLUE_SQUARE]], seed=3, guidance=2.0)
    assert np.array_equal(pixels, np.asarray(red))


@pytest.mark.parametrize("layout, field, message", [
    ([{**RED_CIRCLE, "box": [0.1, 0.1, 1.2, 0.4]}], "layout", r"outside [0, 1]"),
    ([{**RED_CIRCLE, "box": [0.5, 0.1, 0.5, 0.4]}], "layout", "x0 < x1"),
    ([{**RED_CIRCLE, "shape": "hexagon"}], "layout", "unknown shape 'hexagon'"),
    ([RED_CIRCLE] * 4, "layout", "at most 3"),
    ([], "layout", "give a list of objects"),
])
def test_a_bad_layout_is_a_422_naming_it_and_writes_nothing(client, layout, field, message):
    before = sorted(client.out.iterdir()) if client.out.exists() else []
    r = generate(client, {"model": "layout", "layout": layout})
    name, msg = detail(r)
    assert r.status_code == 422 and name == field and message in msg, r.text
    assert (sorted(client.out.iterdir()) if client.out.exists() else []) == before


def test_a_layout_given_to_another_model_is_refused(client):
    name, msg = detail(generate(client, {"model": "sr", "layout": [RED_CIRCLE]}))
    assert name == "layout" and "takes no layout" in msg


def test_super_resolution_from_an_upload(client, tmp_path):
    low = np.random.default_rng(0).integers(0, 255, (8, 12, 3))
    pixels, params = finished(client, generate(client, {"model": "sr", "seed": 1}, files={"low_res": png(low)}),
                              tmp_path)
    assert pixels.shape == (16, 24, 3) and params["size"] == [16, 24] and params["seed"] == 1  # x2, from the upload
    assert "init_image" not in params and "layout" not in params


@pytest.mark.parametrize("files, params, field, message", [
    ({"low_res": (7, 8, 3)}, {}, "low_res", "multiples of"),
    ({"low_res": (8, 8, 3)}, {"size": [32, 32]}, "size", "differs from the 16x16"),
    ({}, {}, "body", "upload it as the file field 'low_res'"),
])
def test_a_bad_super_resolution_upload_is_refused_naming_it(client, files, params, field, message):
    rng = np.random.default_rng(0)
    r = generate(client, {"model": "sr", **params}, files={k: png(rng.integers(0, 255, s)) for k, s in files.items()})
    name, msg = detail(r)
    assert message in msg and name == field, r.text


def test_trained_inpainting_from_an_image_and_a_mask(client, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3))
    mask = np.zeros((16, 16))
    mask[4:12, 0:8] = 255  # white = fill: a quarter
    files = {"init_image": png(image), "mask": png(mask)}
    pixels, params = finished(client, generate(client, {"model": "inpaint", "seed": 5}, files=files), tmp_path)
    assert pixels.shape == (16, 16, 3)
    assert params["init_image"] is True and params["mask"] is True and params["masked_fraction"] == 0.25
    assert "strength" not in params and params["seed"] == 5
    # The mask reaches the network: another mask, the same image and noise, another result.
    mask[:] = 0
    mask[0:4] = 255
    again, params = finished(client, generate(client, {"model": "inpaint", "seed": 5},
                                              files={"init_image": png(image), "mask": png(mask)}), tmp_path)
    assert params["masked_fraction"] == 0.25 and not np.array_equal(again, pixels)


@pytest.mark.parametrize("case, field, message", [
    ("no_mask", "mask", "upload the image as 'init_image' and the mask as 'mask'"),
    ("blank_mask", "mask", "nothing is painted"),
    ("strength", "strength", "strength"),
])
def test_a_bad_inpainting_upload_is_refused_naming_it(client, case, field, message):
    rng = np.random.default_rng(0)
    image, mask = png(rng.integers(0, 255, (16, 16, 3))), png(np.full((16, 16), 255))
    files, params = {
        "no_mask": ({"init_image": image}, {}),
        "blank_mask": ({"init_image": image, "mask": png(np.zeros((16, 16)))}, {}),
        "strength": ({"init_image": image, "mask": mask}, {"strength": 0.5}),
    }[case]
    r = generate(client, {"model": "inpaint", **params}, files=files)
    name, msg = detail(r)
    assert message in msg and name == field, r.text
