"""The page of `latentdiff serve` in a real browser (issue 16): headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which .ci/run installs) driven by selenium against the command running as a process.

It types a prompt, presses Generate, waits for the image in the gallery and checks the PNG's metadata holds the
prompt; "reuse" fills the form back from that PNG; then it uploads an image, paints a mask on the canvas and runs
an inpainting job whose unpainted pixels come back unchanged. The server is then stopped with SIGTERM: it exits
0 and leaves only finished PNGs. No network is used: the page loads nothing from elsewhere.
"""

import io
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentdiff.pngmeta import read_png_params

from helpers.serve_models import class_model, segmentation_model, text_model

PROMPT = "a blue square in the centre"
WAIT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, *options: str, models=(text_model,)):
    """`latentdiff serve` on tiny models (a text model first), as a process, once its page answers: (base URL,
    images folder, process)."""
    folders = [str(build(root / build.__name__)) for build in models]
    out, port = root / "images", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "latentdiff.cli", "serve", *folders, "--port", str(port),
                             "--out", str(out), "--grace", "5", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.status == 200:
                    return url, out, proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("latentdiff serve did not come up:\n" + proc.stdout.read())
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    url, out, proc = start_server(tmp_path_factory.mktemp("serve"),
                                  models=(text_model, class_model, segmentation_model))
    yield url, out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, ("chromedriver is not installed: apt-get install -y chromium chromium-driver "
                         "(.ci/run does it); the browser test is not skipped")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--disable-extensions"):
        options.add_argument(arg)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition)
    except Exception:
        status = driver.find_element("id", "status").text
        error = driver.find_element("id", "error").text
        raise AssertionError(f"waiting for {what}: status {status!r}, error {error!r}") from None


def gallery(driver):
    return driver.find_elements("css selector", "#gallery figure")


def download(figure, tmp_path: Path, name: str):
    """The PNG behind a gallery item's download link: (pixels, parameters)."""
    href = figure.find_element("css selector", "a.download").get_attribute("href")
    path = tmp_path / name
    with urllib.request.urlopen(href, timeout=10) as r:
        path.write_bytes(r.read())
    return np.asarray(Image.open(path)), read_png_params(path)


def test_prompt_generate_gallery_reuse_and_inpainting_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    url, out, proc = server
    d = browser
    d.get(url + "/")
    wait_for(d, lambda d: d.find_elements("css selector", "#model option"), "the model list")
    prompt = d.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    for field, value in (("num", "1"), ("seed", "5")):
        box = d.find_element("id", field)
        box.clear()
        box.send_keys(value)
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: len(gallery(d)) == 1 and d.execute_script(
        "return document.querySelector('#gallery img').naturalWidth") > 0, "the first image in the gallery")
    pixels, params = download(gallery(d)[0], tmp_path, "first.png")
    assert params["prompt"] == PROMPT and params["seed"] == 5 and pixels.shape == (16, 16, 3)
    assert "done" in d.find_element("id", "status").text

    # "reuse" reads the PNG's text chunk in the page and fills the form back
    prompt.clear()
    prompt.send_keys("something else")
    d.find_element("css selector", "#gallery figure button.reuse").click()
    wait_for(d, lambda d: d.find_element("id", "prompt").get_attribute("value") == PROMPT, "reuse to fill the prompt")

    # inpainting: upload an image, paint a stroke over its middle, generate
    source = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    source_file = tmp_path / "source.png"
    Image.fromarray(source).save(source_file)
    d.find_element("css selector", "#image-row summary").click()
    d.find_element("id", "init_image").send_keys(str(source_file))
    canvas = wait_for(d, lambda d: d.find_element("id", "mask-canvas").is_displayed()
                      and d.find_element("id", "mask-canvas"), "the mask canvas")
    ActionChains(d).move_to_element_with_offset(canvas, -60, -20).click_and_hold().move_by_offset(60, 10) \
        .move_by_offset(60, 10).release().perform()
    assert d.execute_script("return state.maskPainted") is True
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: len(gallery(d)) == 2, "the inpainted image in the gallery")
    pixels, params = download(gallery(d)[0], tmp_path, "inpainted.png")  # the newest comes first
    assert params["mask"] is True and params["prompt"] == PROMPT and "strength" not in params
    assert 0 < params["masked_fraction"] < 0.5
    kept = (pixels == source).all(-1).mean()
    assert kept >= 1 - params["masked_fraction"] - 1e-9 and kept < 1  # unpainted pixels unchanged, painted redrawn
    d.save_screenshot(str(tmp_path / "page.png"))
    assert Image.open(io.BytesIO((tmp_path / "page.png").read_bytes())).size[0] > 0

    # the form follows the model: a class picker and no prompt; then a map upload, no guidance
    from selenium.webdriver.support.ui import Select

    Select(d.find_element("id", "model")).select_by_value("class_model")
    assert not d.find_element("id", "prompt").is_displayed() and d.find_element("id", "label").is_displayed()
    Select(d.find_element("id", "label")).select_by_value("7")
    d.find_element("id", "remove-image").click()
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: len(gallery(d)) == 3, "the class image in the gallery")
    pixels, params = download(gallery(d)[0], tmp_path, "class.png")
    assert params["class"] == 7 and "prompt" not in params and pixels.shape == (8, 8)
    Select(d.find_element("id", "model")).select_by_value("segmentation_model")
    assert not d.find_element("id", "guidance").is_displayed() and not d.find_element("id", "label").is_displayed()
    seg = np.zeros((16, 32), dtype=np.uint8)
    seg[4:12, 3:14] = 9
    Image.fromarray(seg).save(tmp_path / "map.png")
    d.find_element("id", "cond-segmentation").send_keys(str(tmp_path / "map.png"))
    d.find_element("id", "generate").click()
    wait_for(d, lambda d: len(gallery(d)) == 4, "the image drawn from the map")
    pixels, params = download(gallery(d)[0], tmp_path, "seg.png")
    assert pixels.shape == (16, 32, 3) and params["size"] == [16, 32]  # the size follows the map

    # SIGTERM: the server shuts down cleanly and leaves only the finished images
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert sorted(p.suffix for p in out.iterdir()) == [".png"] * 4


def test_a_token_in_the_page_address_reaches_every_call(tmp_path, browser):
    """With --token, the page opened as /?token=T sends it with every call: the model list, the job, its events
    and the image; without it the page shows the 401."""
    url, out, proc = start_server(tmp_path, "--token", "s3cret")
    try:
        d = browser
        d.get(url + "/?token=s3cret")
        wait_for(d, lambda d: d.find_elements("css selector", "#model option"), "the model list")
        d.find_element("id", "generate").click()
        wait_for(d, lambda d: len(gallery(d)) == 4 and d.execute_script(  # the form's default: 4 images
            "return [...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)"),
            "the images in the gallery")
        assert "token=s3cret" in gallery(d)[0].find_element("css selector", "a.download").get_attribute("href")
        d.get(url + "/")
        d.execute_script("localStorage.clear()")
        d.get(url + "/")
        wait_for(d, lambda d: "401" in d.find_element("id", "error").text, "the 401 on the page")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
