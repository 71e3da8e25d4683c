"""`latentdiff serve` measured from outside: time to the first page load, the API's overhead over the Python API
for one image, and a load check with N concurrent clients.

1. startup: seconds from starting `latentdiff serve MODEL` (a fresh process) until ``GET /`` answers 200;
2. overhead: one image of ``--steps`` steps through the API (POST, server-sent events until done, GET the PNG)
   against the same image from ``Pipeline.sample`` in this process, alternated ``--repeats`` times (medians);
3. load: for each N of ``--clients``, N threads on 127.0.0.1 each send at most ``--requests`` requests (different
   prompts and seeds, equal settings, so the server may batch them) within ``--seconds`` seconds, then stop. A 429
   is counted and the client waits its Retry-After (at most 5 s). Reports throughput (images/s), p50/p95 latency
   of accepted requests (POST to PNG received), the 429 count, the mean batch size, that every accepted job
   finished with a readable PNG (none lost), and the server's resident memory before and after.

    nice -n 19 .venv/bin/python benchmarks/serve_load.py outputs/demo/run [--clients 4 16] [--steps 20]
    nice -n 19 .venv/bin/python benchmarks/serve_load.py outputs/demo/run --screenshot docs/images/serve.png

``--screenshot`` drives headless Chromium (as tests/test_serve_browser.py does) to fill the page's gallery and
saves a picture of it. Server and client both use ``--threads`` torch threads (default 1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROMPTS = ["a red circle at the top left", "a blue square in the centre", "a green triangle at the bottom right",
           "a yellow circle at the top right and a red square at the bottom left", "a blue triangle in the centre"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (Linux /proc) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def follow(base: str, events_path: str) -> dict:
    """Read a job's server-sent events until its final state; that state's data."""
    with urllib.request.urlopen(base + events_path, timeout=600) as r:
        event = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "state":
                data = json.loads(line[6:])
                if data["state"] in ("done", "failed", "cancelled"):
                    return data
    raise RuntimeError("the event stream ended without a final state")


def fetch_png(base: str, path: str) -> dict:
    """GET an image; its latentdiff parameters (raises when it is not a PNG written by the server)."""
    from PIL import Image

    with urllib.request.urlopen(base + path, timeout=60) as r:
        data = r.read()
    with Image.open(io.BytesIO(data)) as im:
        return json.loads(im.text["latentdiff"])


def poll(base: str, status_path: str, every: float = 0.05) -> dict:
    """Poll GET /api/jobs/{id} until a final state (a client that takes no previews); the job."""
    while True:
        with urllib.request.urlopen(base + status_path, timeout=60) as r:
            job = json.loads(r.read())
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(every)


def generate(base: str, body: dict, events: bool = True) -> tuple[int, float, dict]:
    """One request to the end: (HTTP status of the POST, seconds from POST to the last PNG, final job or error).
    ``events``: follow the server-sent events (the server then makes previews), else poll the job's status."""
    t0 = time.perf_counter()
    status, job, headers = post(base + "/api/generate", body)
    if status != 202:
        return status, time.perf_counter() - t0, {"detail": job, "retry_after": headers.get("Retry-After")}
    final = follow(base, job["events"]) if events else poll(base, job["status"])
    if final["state"] == "done":
        final["params_read"] = [fetch_png(base, u) for u in final["images"]]
    final["id"] = job["id"]
    return status, time.perf_counter() - t0, final


def start_server(model: str, port: int, out: str, threads: int, max_queue: int, max_images: int):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "latentdiff.cli", "serve", model, "--port", str(port), "--out", out, "--quiet",
           "--max-queue", str(max_queue), "--max-images", str(max_images)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(base + "/", timeout=2) as r:
                if r.status == 200:
                    return proc, base, time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("latentdiff serve exited:\n" + proc.stderr.read())
        time.sleep(0.05)


def overhead(base: str, model: str, steps: int, repeats: int) -> dict:
    """Median seconds of one image through Pipeline.sample, through the API polled (no previews) and through the
    API with server-sent events (previews decoded every steps/5), the three alternated in each round."""
    import latentdiff

    pipe = latentdiff.load(model)
    body = {"prompt": PROMPTS[1], "steps": steps, "num": 1}
    times = {"python_s": [], "api_poll_s": [], "api_events_s": [], "server_run_poll_s": [], "server_run_events_s": []}
    for k in range(repeats + 1):  # the first round warms everything up and is not counted
        t0 = time.perf_counter()
        pipe.sample(1, prompts=[PROMPTS[1]], steps=steps, seed=k)
        py = time.perf_counter() - t0
        runs = [generate(base, {**body, "seed": k}, events=False), generate(base, {**body, "seed": k})]
        run_s = []
        for status, _, final in runs:
            assert status == 202 and final["state"] == "done", final
            with urllib.request.urlopen(f"{base}/api/jobs/{final['id']}", timeout=10) as r:
                run_s.append(json.loads(r.read())["run_s"])  # the server's own time in Pipeline.sample + PNG
        if k:
            for key, value in zip(times, (py, runs[0][1], runs[1][1], *run_s)):
                times[key].append(value)
    out = {key: statistics.median(v) for key, v in times.items()}
    # What HTTP, the queue and polling add around the server's own work, round by round (same process, same time).
    out["wrap_poll_s"] = statistics.median(a - r for a, r in zip(times["api_poll_s"], times["server_run_poll_s"]))
    out["wrap_events_s"] = statistics.median(a - r for a, r in zip(times["api_events_s"],
                                                                    times["server_run_events_s"]))
    out["repeats"] = repeats
    return out


def load_check(base: str, pid: int, clients: int, requests: int, seconds: float, steps: int) -> dict:
    """``clients`` threads, each at most ``requests`` requests within ``seconds``; see the module docstring."""
    results, lock = [], threading.Lock()
    stop_at = time.perf_counter() + seconds
    rss_before = rss_mib(pid)

    def client(c: int):
        for r in range(requests):
            if time.perf_counter() >= stop_at:
                return
            body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "seed": 1000 * c + r, "steps": steps, "num": 1}
            status, seconds_, final = generate(base, body)
            with lock:
                results.append((status, seconds_, final))
            if status == 429:
                time.sleep(min(5.0, float(final.get("retry_after") or 1)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    accepted = [(s, f) for st, s, f in results if st == 202]
    done = [(s, f) for s, f in accepted if f.get("state") == "done" and len(f.get("params_read", [])) == 1]
    lost = len(accepted) - len(done)
    latencies = sorted(s for s, _ in done)
    batches = []
    for _, f in done:
        with urllib.request.urlopen(f"{base}/api/jobs/{f['id']}", timeout=10) as r:
            batches.append(json.loads(r.read())["batch"])
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "sent": len(results), "accepted": len(accepted), "rejected_429": sum(
        st == 429 for st, _, _ in results), "other_errors": sum(st not in (202, 429) for st, _, _ in results),
        "done": len(done), "lost": lost, "wall_s": wall, "images_per_s": len(done) / wall,
        "p50_s": statistics.median(latencies) if latencies else float("nan"), "p95_s": q[18] if q else float("nan"),
        "mean_batch": statistics.mean(batches) if batches else float("nan"),
        "rss_before_mib": rss_before, "rss_after_mib": rss_mib(pid)}


def screenshot(base: str, path: Path, prompt: str, num: int) -> None:
    """Headless Chromium: generate ``num`` images of ``prompt`` on the page and save a screenshot of it."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements("css selector", "#model option"))
        for field, value in (("prompt", prompt), ("num", str(num)), ("seed", "0")):
            box = driver.find_element("id", field)
            box.clear()
            box.send_keys(value)
        driver.find_element("id", "generate").click()
        WebDriverWait(driver, 300).until(lambda d: len(d.find_elements("css selector", "#gallery figure")) == num
                                         and d.execute_script("return [...document.querySelectorAll('#gallery img')]"
                                                              ".every(i => i.complete && i.naturalWidth > 0)"))
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
        print(f"wrote {path}")
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="run or model folder (the demo's: outputs/demo/run)")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--requests", type=int, default=6, help="requests per client at most")
    ap.add_argument("--seconds", type=float, default=60.0, help="a client sends no new request after this")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=9, help="overhead: timed rounds")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-images", type=int, default=16, help="the server's batch bound")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of this process")
    ap.add_argument("--screenshot", default=None, metavar="PNG", help="only save a screenshot of the page")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        proc, base, startup = start_server(args.model, free_port(), out, args.threads, args.max_queue,
                                           args.max_images)
        try:
            if args.screenshot:
                screenshot(base, Path(args.screenshot), PROMPTS[3], 8)
                return
            print(f"startup: {startup:.2f} s from `latentdiff serve` to the first page load (GET / 200)")
            o = overhead(base, args.model, args.steps, args.repeats)
            p = o["python_s"]
            print(f"one {args.steps}-step image (medians of {o['repeats']} alternated rounds): Python API {p:.3f} s; "
                  f"HTTP API polled {o['api_poll_s']:.3f} s (overhead {(o['api_poll_s'] - p) * 1e3:+.0f} ms, ratio "
                  f"{o['api_poll_s'] / p:.3f}); HTTP API with events and previews {o['api_events_s']:.3f} s (overhead "
                  f"{(o['api_events_s'] - p) * 1e3:+.0f} ms, ratio {o['api_events_s'] / p:.3f})")
            print(f"  inside the server (job run_s: sampling + PNG write): polled {o['server_run_poll_s']:.3f} s, with "
                  f"events {o['server_run_events_s']:.3f} s; HTTP + queue + waiting around it: polled "
                  f"{o['wrap_poll_s'] * 1e3:.0f} ms, events {o['wrap_events_s'] * 1e3:.0f} ms")
            rows = [load_check(base, proc.pid, n, args.requests, args.seconds, args.steps) for n in args.clients]
            print(f"\nload: each client at most {args.requests} requests within {args.seconds:.0f} s; {args.steps} "
                  f"steps, 1 image each; --max-queue {args.max_queue}")
            head = ("clients", "sent", "accepted", "429", "done", "lost", "images/s", "p50 s", "p95 s", "mean batch",
                    "RSS before MiB", "RSS after MiB")
            print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            for r in rows:
                print(f"| {r['clients']} | {r['sent']} | {r['accepted']} | {r['rejected_429']} | {r['done']} | "
                      f"{r['lost']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                      f"{r['mean_batch']:.2f} | {r['rss_before_mib']:.0f} | {r['rss_after_mib']:.0f} |")
            if args.json:
                Path(args.json).write_text(json.dumps({"startup_s": startup, "overhead": o, "load": rows}, indent=1))
        finally:
            proc.terminate()
            rc = proc.wait(timeout=60)
            leftovers = [p.name for p in Path(out).iterdir() if not p.name.endswith(".png") or p.name.startswith(".")]
            print(f"\nserver stopped by SIGTERM: exit status {rc}; files other than finished PNGs left: {leftovers}")


if __name__ == "__main__":
    main()
