"""`latentdiff serve`'s HTTP API through FastAPI's TestClient (issue 16): generate, poll, events, batching, cancel,
the 422 / 400 / 429 / 401 paths, path traversal, uploads (image to image, inpainting, a segmentation map),
shutdown with jobs in flight. Models are tiny untrained folders (tests/helpers/serve_models.py); a "gate" wraps a
model's network call to hold its worker inside a step while the test queues, cancels or shuts down."""

import io
import json
import logging
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import latentdiff
from latentdiff.pngmeta import read_png_params
from latentdiff.serve import create_app, load_models
from latentdiff.serve.schema import Limits

from helpers.clitools import run_cli
from helpers.serve_models import class_model, latent_text_model, segmentation_model, text_model

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"text": text_model(root / "text"), "digits": class_model(root / "digits"),
            "latent": latent_text_model(root / "latent"), "seg": segmentation_model(root / "seg")}


@pytest.fixture
def serve(folders, tmp_path):
    """serve(names..., **create_app options) -> (TestClient inside its lifespan, {name: ServedModel}, out_dir)."""
    opened = []

    def start(*names, **options):
        models = load_models([folders[n] for n in (names or ("text", "digits", "latent", "seg"))])
        out = tmp_path / f"out{len(opened)}"
        client = TestClient(create_app(models, out_dir=out, **options))
        client.__enter__()
        opened.append(client)
        return client, {m.name: m for m in models}, out

    yield start
    for client in opened:
        client.__exit__(None, None, None)


class Gate:
    """Holds the worker of ``model`` inside its next network call until :meth:`open`."""

    def __init__(self, model):
        self.entered, self.released = threading.Event(), threading.Event()
        inner = model.pipe.model_fn

        def held(x, t, **cond):
            self.entered.set()
            self.released.wait(TIMEOUT)
            return inner(x, t, **cond)

        model.pipe.model_fn = held

    def wait_entered(self):
        assert self.entered.wait(TIMEOUT), "the worker never reached the network"

    def open(self):
        self.released.set()

    def open_when(self, condition):
        """Open from another thread once ``condition()`` holds."""

        def watch():
            deadline = time.monotonic() + TIMEOUT
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.open()

        threading.Thread(target=watch, daemon=True).start()


def wait_job(client, job_id, states=("done", "failed", "cancelled")):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['state']} after {TIMEOUT} s")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def fetch_png(client, url, tmp_path):
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    path = tmp_path / url.rsplit("/", 1)[1]
    path.write_bytes(r.content)
    return np.asarray(Image.open(path)), read_png_params(path)


def python_api(model, **kwargs):
    """The same image through the Python API: uint8 arrays, as the PNGs hold them."""
    pipe = latentdiff.load(model.path)
    return [np.asarray(im) for im in pipe.sample(**kwargs)]


# ----------------------------------------------------------------------------------------------------------


def test_models_describe_what_each_model_takes(serve):
    client, _, _ = serve()
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert list(models) == ["text", "digits", "latent", "seg"]
    text, digits, latent, seg = (models[n] for n in ("text", "digits", "latent", "seg"))
    assert text["inputs"]["prompt"] and not text["inputs"]["classes"] and text["inputs"]["guidance"]
    assert digits["inputs"]["classes"] == 10 and not digits["inputs"]["prompt"] and digits["channels"] == 1
    assert latent["latent"] and latent["size_multiple"] == 8  # f=4 first stage x the tiny U-Net's 2
    assert seg["inputs"]["conditions"] == {"segmentation": "class_map"} and not seg["inputs"]["guidance"]
    assert "dpmpp_2m" in text["samplers"] and text["defaults"]["steps"] == 4 and text["defaults"]["size"] == [16, 16]
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text
    # Self-contained: nothing is loaded from another host (no src=/href= to http(s), no @import, no url()).
    assert not any(s in page.text for s in ('src="http', "src='http", 'href="http', "@import", "url("))


def test_generate_poll_and_png_equal_the_python_api(serve, tmp_path):
    client, models, out = serve()
    r = client.post("/api/generate", json={"prompt": "a red circle at the top left", "num": 2, "seed": 7,
                                           "guidance": 3.0, "sampler": "dpmpp_2m", "steps": 3})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "done" and job["step"] == job["total"] == 3 and len(job["images"]) == 2
    expected = python_api(models["text"], num=2, prompts=["a red circle at the top left"], seed=7, guidance=3.0,
                          sampler="dpmpp_2m", steps=3)
    for i, url in enumerate(job["images"]):
        pixels, params = fetch_png(client, url, tmp_path)
        assert np.array_equal(pixels, expected[i])
        assert params["prompt"] == "a red circle at the top left" and params["seed"] == 7 + i
        assert params["sampler"] == "dpmpp_2m" and params["steps"] == 3 and params["guidance"] == 3.0
        assert params["model"] == models["text"].path
    assert sorted(p.name for p in out.iterdir()) == sorted(u.rsplit("/", 1)[1] for u in job["images"])
    # class model: the label reaches the PNG; a random seed is drawn when none is given, and recorded
    r = client.post("/api/generate", json={"model": "digits", "label": 4})
    job = wait_job(client, r.json()["id"])
    _, params = fetch_png(client, job["images"][0], tmp_path)
    assert params["class"] == 4 and params["seed"] == r.json()["seed"]


def test_events_stream_progress_previews_and_the_result(serve):
    client, models, _ = serve("text")
    gate = Gate(models["text"])
    job_id = client.post("/api/generate", json={"prompt": "a blue square", "steps": 12, "seed": 1}).json()["id"]
    job = client.app.state.scheduler.jobs[job_id]
    gate.open_when(lambda: job.listeners > 0)  # previews are made only while someone follows the events
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    events = [(block.split("\n")[0][7:], json.loads(block.split("\n")[1][6:]))
              for block in text.strip().split("\n\n") if block.startswith("event:")]
    kinds = [k for k, _ in events]
    assert kinds[0] == "state" and events[0][1]["state"] == "queued"
    assert [d["step"] for k, d in events if k == "progress"] == list(range(1, 13))
    previews = [d for k, d in events if k == "preview"]
    assert [d["step"] for d in previews] == [2, 4, 6, 8, 10]  # every total/5 steps, not the last
    assert previews[0]["image"].startswith("data:image/png;base64,")
    assert events[-1][0] == "state" and events[-1][1]["state"] == "done" and len(events[-1][1]["images"]) == 1
    assert all(e["image"] is None for e in job.events if e["event"] == "preview")  # dropped once finished
    assert job.listeners == 0
    polled = client.post("/api/generate", json={"prompt": "a blue square", "steps": 12}).json()["id"]
    wait_job(client, polled)
    assert not [e for e in client.app.state.scheduler.jobs[polled].events if e["event"] == "preview"]


def test_equal_settings_are_batched_and_each_image_keeps_its_seed(serve, tmp_path):
    client, models, _ = serve("text")
    gate = Gate(models["text"])
    first = client.post("/api/generate", json={"prompt": "a red circle", "seed": 0}).json()["id"]
    gate.wait_entered()
    prompts = ["a blue square", "a green triangle", "a red circle at the top left"]
    ids = [client.post("/api/generate", json={"prompt": p, "seed": 10 * k, "num": 1 + k % 2}).json()["id"]
           for k, p in enumerate(prompts)]
    other = client.post("/api/generate", json={"prompt": "a blue square", "seed": 5, "steps": 2}).json()["id"]
    gate.open()
    jobs = [wait_job(client, i) for i in ids]
    assert [j["batch"] for j in jobs] == [4, 4, 4]  # 1 + 2 + 1 images drawn together
    assert wait_job(client, first)["batch"] == 1 and wait_job(client, other)["batch"] == 1  # other settings
    del models["text"].pipe.model_fn
    for k, (job, prompt) in enumerate(zip(jobs, prompts)):
        alone = python_api(models["text"], num=job["num"], prompts=[prompt], seed=10 * k)
        for url, want in zip(job["images"], alone):
            assert np.array_equal(fetch_png(client, url, tmp_path)[0], want)


def test_cancel_queued_and_running_jobs_frees_their_slots_and_writes_nothing(serve):
    client, models, out = serve("text", limits=Limits(max_queue=2))
    gate = Gate(models["text"])
    running = client.post("/api/generate", json={"prompt": "a red circle", "steps": 4}).json()["id"]
    gate.wait_entered()
    queued = client.post("/api/generate", json={"prompt": "a red circle", "steps": 3}).json()["id"]
    full = client.post("/api/generate", json={"prompt": "a red circle"})
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    r = client.post(f"/api/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"  # at once: it never ran
    accepted = client.post("/api/generate", json={"prompt": "a red circle", "steps": 2})  # its slot is free
    assert accepted.status_code == 202
    client.post(f"/api/jobs/{running}/cancel")
    gate.open()
    assert wait_job(client, running)["state"] == "cancelled" and wait_job(client, running)["images"] == []
    done = wait_job(client, accepted.json()["id"])
    assert done["state"] == "done"
    assert sorted(p.name for p in out.iterdir()) == [done["images"][0].rsplit("/", 1)[1]]
    assert client.post(f"/api/jobs/{running}/cancel").json()["state"] == "cancelled"  # idempotent


def test_a_failed_job_reports_its_error_and_frees_its_slot(serve):
    client, models, out = serve("text", limits=Limits(max_queue=1))

    def broken(x, t, **cond):
        raise RuntimeError("the network broke")

    models["text"].pipe.model_fn = broken
    job = wait_job(client, client.post("/api/generate", json={"prompt": "a red circle"}).json()["id"])
    assert job["state"] == "failed" and "the network broke" in job["error"]
    del models["text"].pipe.model_fn
    again = client.post("/api/generate", json={"prompt": "a red circle"}).json()["id"]
    assert wait_job(client, again)["state"] == "done"
    assert len(list(out.iterdir())) == 1


@pytest.mark.parametrize("body, field, message", [
    ({"prompt": "a red circle", "stepz": 3}, "stepz", "Extra inputs"),
    ({"prompt": "a red circle", "steps": "ten"}, "steps", "integer"),
    ({"prompt": "a red circle", "num": 0}, "num", "greater than or equal to 1"),
    ({"prompt": "a red circle", "strength": 1.5}, "strength", "less than or equal to 1"),
    ({"prompt": "a red circle", "size": [16]}, "size", ""),
    ({"model": "nope"}, "model", "unknown model 'nope'"),
    ({"model": "digits", "label": 10}, "label", "out of range 0..9"),
    ({"model": "digits", "prompt": "a red circle"}, "prompt", "takes no prompts"),
    ({"prompt": "a red circle", "label": 3}, "label", "takes no class labels"),
    ({"prompt": "a red circle", "sampler": "fast"}, "sampler", "unknown sampler 'fast'"),
    ({"prompt": "a red circle", "size": [15, 16]}, "size", "not divisible by 2"),
    ({"prompt": "a red circle " * 3}, "prompt", "longer than the context length 8"),
    ({"model": "seg"}, "body", "upload it as the file field 'segmentation'"),
    ({"prompt": "a red circle", "strength": 0.5}, "strength", "upload the image as 'init_image'"),
])
def test_a_bad_field_is_a_422_that_names_it(serve, body, field, message):
    client, _, out = serve()
    r = client.post("/api/generate", json=body)
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"][:2] == ["body", field] and message in err["msg"]
    assert not out.exists() or not list(out.iterdir())


def test_limits_are_400s(serve):
    client, _, _ = serve("text", limits=Limits(max_steps=10, max_images=3, max_size=32, max_upload_bytes=2000))
    for body, message in [({"steps": 11}, "steps 11 exceeds"), ({"num": 4}, "num 4 exceeds"),
                          ({"size": [64, 32]}, "size 64x32 is outside 1..32")]:
        r = client.post("/api/generate", json={"prompt": "a red circle", **body})
        assert r.status_code == 400 and message in r.json()["detail"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    r = client.post("/api/generate", data={"params": json.dumps({"prompt": "a red circle"})},
                    files={"init_image": ("big.png", png_bytes(noise), "image/png")})
    assert r.status_code == 400 and "upload 'init_image' exceeds" in r.json()["detail"]
    chunks = iter([b"{", b" " * 2**20, b" " * 2**20, b"}"])  # a generator: sent chunked, without Content-Length
    r = client.post("/api/generate", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "this server takes at most" in r.json()["detail"]
    r = client.post("/api/generate", data={"params": "{}"},
                    files={"init_image": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_image"]


def test_the_token_guards_every_api_call_but_not_the_page(serve):
    client, _, _ = serve("text", token="s3cret")
    assert client.get("/").status_code == 200
    assert client.get("/api/models").status_code == 401
    assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/models", headers={"X-Token": "s3cret"}).status_code == 200
    assert client.post("/api/generate", json={"prompt": "a red circle"}).status_code == 401
    r = client.post("/api/generate?token=s3cret", json={"prompt": "a red circle"})
    assert r.status_code == 202
    assert client.get(f"/api/jobs/{r.json()['id']}").status_code == 401
    deadline = time.monotonic() + TIMEOUT
    while (job := client.get(f"/api/jobs/{r.json()['id']}?token=s3cret").json())["state"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get(job["images"][0]).status_code == 401
    assert client.get(job["images"][0] + "?token=s3cret").status_code == 200


def test_client_text_never_reaches_the_file_system(serve, tmp_path):
    client, _, out = serve("text")
    job = wait_job(client, client.post("/api/generate", json={"prompt": "a red circle"}).json()["id"])
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(Image.new("RGB", (4, 4))))
    for name in ["../secret.png", "..%2Fsecret.png", "..%2F..%2Fsecret.png", f"..%2F{tmp_path.name}%2Fsecret.png",
                 "%2Fetc%2Fpasswd", "0" * 32 + ".png", job["images"][0].rsplit("/", 1)[1].upper(), "secret.png"]:
        assert client.get(f"/api/images/{name}").status_code == 404, name
    for job_id in ["..%2F..%2Fetc%2Fpasswd", "x" * 32, "0" * 32]:
        assert client.get(f"/api/jobs/{job_id}").status_code == 404
        assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 404
    # An upload's file name is never used: the image is read from memory, outputs get server-made names.
    image = png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    r = client.post("/api/generate", data={"params": json.dumps({"prompt": "a red circle", "strength": 0.5})},
                    files={"init_image": ("../../evil.png", image, "image/png")})
    assert wait_job(client, r.json()["id"])["state"] == "done"
    assert not (out.parent / "evil.png").exists() and not (out.parent.parent / "evil.png").exists()
    assert all(len(p.stem) == 32 and p.suffix == ".png" for p in out.iterdir())


def test_image_to_image_and_inpainting_keep_what_they_should(serve, tmp_path):
    client, models, _ = serve("text", "latent")
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255  # white = fill
    files = {"init_image": ("a.png", png_bytes(Image.fromarray(source)), "image/png"),
             "mask": ("m.png", png_bytes(Image.fromarray(mask)), "image/png")}
    r = client.post("/api/generate", data={"params": json.dumps({"prompt": "a red circle", "seed": 2})}, files=files)
    job = wait_job(client, r.json()["id"])
    pixels, params = fetch_png(client, job["images"][0], tmp_path)
    keep = mask == 0
    assert np.array_equal(pixels[keep], source[keep])  # RePaint ends on the known image exactly
    assert not np.array_equal(pixels[~keep], source[~keep])
    assert params["mask"] is True and params["masked_fraction"] == 0.25 and "strength" not in params
    # image to image: fewer steps run (strength 0.5 of 4), the PNG records the strength
    r = client.post("/api/generate", data={"params": json.dumps({"prompt": "a red circle", "strength": 0.5})},
                    files={"init_image": files["init_image"]})
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "done" and job["total"] == 2 and job["params"][0]["strength"] == 0.5
    # a latent model: the image goes through the first stage, the mask onto the 4x4 latent grid
    r = client.post("/api/generate", data={"params": json.dumps({"model": "latent", "prompt": "a red circle"})},
                    files=files)
    assert wait_job(client, r.json()["id"])["state"] == "done"
    r = client.post("/api/generate", data={"params": json.dumps({"prompt": "a red circle"})},
                    files={"mask": files["mask"]})
    assert r.status_code == 422 and "upload the image as 'init_image' too" in r.json()["detail"][0]["msg"]


def test_a_segmentation_map_upload_sets_the_condition_and_the_size(serve):
    client, _, _ = serve("seg")
    seg = np.zeros((16, 32), dtype=np.uint8)
    seg[2:10, 4:12] = 5
    r = client.post("/api/generate", data={"params": json.dumps({"seed": 0})},
                    files={"segmentation": ("s.png", png_bytes(Image.fromarray(seg)), "image/png")})
    job = wait_job(client, r.json()["id"])
    assert job["state"] == "done", job
    assert client.get(job["images"][0]).content and job["params"][0]["size"] == [16, 32]
    r = client.post("/api/generate", data={"params": json.dumps({"size": [16, 16]})},
                    files={"segmentation": ("s.png", png_bytes(Image.fromarray(seg)), "image/png")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "size"]
    assert "differs from the 16x32 of the uploaded segmentation" in r.json()["detail"][0]["msg"]
    rgb = png_bytes(Image.new("RGB", (16, 16)))
    r = client.post("/api/generate", files={"segmentation": ("s.png", rgb, "image/png")})
    assert r.status_code == 422 and "PNG of class ids" in r.json()["detail"][0]["msg"]


def test_shutdown_cancels_queued_and_running_jobs_and_writes_nothing_partial(folders, tmp_path):
    models = load_models([folders["text"]])
    out = tmp_path / "out"
    client = TestClient(create_app(models, out_dir=out, grace=0.2))
    client.__enter__()
    gate = Gate(models[0])
    running = client.post("/api/generate", json={"prompt": "a red circle"}).json()["id"]
    gate.wait_entered()
    queued = client.post("/api/generate", json={"prompt": "a red circle", "steps": 2}).json()["id"]
    app = client.app
    threading.Timer(0.5, gate.open).start()  # the network returns after the grace period has passed
    client.__exit__(None, None, None)
    jobs = app.state.scheduler.jobs
    assert jobs[queued].state == "cancelled" and jobs[running].state == "cancelled"
    assert list(out.iterdir()) == []  # no image, no temporary file


def test_each_request_is_logged_with_its_duration(serve, caplog):
    client, _, _ = serve("text")
    with caplog.at_level(logging.INFO, logger="latentdiff.serve"):
        client.get("/api/models")
        client.post("/api/generate", json={"prompt": "a red circle", "stepz": 1})
    lines = [r.getMessage() for r in caplog.records if r.name == "latentdiff.serve"]
    assert any(line.startswith("GET /api/models 200 ") and line.endswith(" ms") for line in lines), lines
    assert any(line.startswith("POST /api/generate 422 ") for line in lines), lines


def test_the_command_refuses_a_public_address_without_a_token(folders, capsys):
    rc, out, err = run_cli(capsys, "serve", folders["text"], "--host", "0.0.0.0")
    assert rc == 2 and "--host 0.0.0.0" in err and "--token" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "serve", folders["text"], "--max-queue", "0")
    assert rc == 2 and "--max-queue must be >= 1" in err
