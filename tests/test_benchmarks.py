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


def test_first_stage_ceilings_prints_a_row_per_autoencoder(tmp_path, capsys):
    import torch

    from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, save_autoencoder

    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4, norm="pixel",
                                       mid_attention=False))
    save_autoencoder(ae, str(tmp_path / "ae"), latent_scale=1.0)
    bench = _module("first_stage_ceilings")
    assert bench.main([str(tmp_path / "ae"), "--num", "2", "--num-large", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {tmp_path / 'ae'} |")]
    assert len(rows) == 1
    cells = rows[0].split(" | ")
    assert len(cells[1].split(" / ")) == 3 and len(cells[2].split(" / ")) == 3  # PSNR and mIoU at three sizes
    assert all(0.0 <= float(v) <= 1.0 for v in cells[2].split(" / ")) and cells[3].endswith("/2)")
