"""The benchmark scripts run (tiny sizes, CPU): benchmarks/gpu.py is ready for the day a GPU is there."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_benchmark_runs_on_cpu_at_tiny_size(tmp_path, capsys):
    gpu = _module("gpu")
    out = tmp_path / "gpu.json"
    result = gpu.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--sample-steps", "2",
                       "--train-batches", "2", "--sample-batches", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "speed ratio latentdiff / diffusers: train b2" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["kind"]) for r in rows] == [("latentdiff", "train"), ("latentdiff", "sample"),
                                                      ("diffusers", "train"), ("diffusers", "sample")]
    assert rows[0]["params"] == rows[2]["params"]  # the same network in both libraries
    assert all(r["img_s"] > 0 and r["peak_mb"] > 0 for r in rows) and 0 < rows[0]["mfu"] < 1
    assert result["tiny"] and not result["amp_bf16"]


def test_gpu_peak_table_prefers_the_longest_name():
    gpu = _module("gpu")
    assert gpu.listed_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu.listed_peak("NVIDIA H200") == 989.0
    assert gpu.listed_peak("Some Future GPU") is None
