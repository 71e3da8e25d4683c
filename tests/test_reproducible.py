"""Reproducible runs (issue 17, item 1): the same config and seed give byte-identical weights, optimizer states,
RNG states, metrics and exported model folders on CPU, for every objective. Each run is a fresh Python process,
so nothing (an RNG state, a cache, an import-time draw) carries over from the first run to the second."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiff.data import make_dataset
from latentdiff.first_stage import first_images
from latentdiff.nn.autoencoder import Autoencoder, AutoencoderConfig, compute_latent_scale, save_autoencoder

TESTS = Path(__file__).parent


def _start(kind: str, out: Path, cache: Path, *extra) -> subprocess.Popen:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=path, LATENTDIFF_CACHE=str(cache))
    return subprocess.Popen([sys.executable, "-m", "helpers.repro_script", kind, str(out), *map(str, extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _digest(proc: subprocess.Popen) -> dict[str, str]:
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return dict(line.split()[1:] for line in out.splitlines() if line.startswith("digest "))


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, resolution=16))
    folder = tmp_path_factory.mktemp("ae") / "kl_f2"
    x = first_images(make_dataset("shapes", size=16), 8)
    save_autoencoder(ae, str(folder), latent_scale=compute_latent_scale(ae, x, torch.Generator().manual_seed(0)))
    return folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ddpm", "ae", "ldm"])
def test_two_fresh_processes_write_the_same_bytes(kind, first_stage, tmp_path):
    extra = [first_stage] if kind == "ldm" else []
    # Each run builds its own latent cache (a shared one would hide a difference in the encoding).
    runs = [_start(kind, tmp_path / f"run{i}", tmp_path / f"cache{i}", *extra) for i in (1, 2)]
    first, second = (_digest(p) for p in runs)
    weights = [f for f in first if f.endswith(".safetensors")]
    expected = {"ddpm": 4, "ae": 5, "ldm": 5}[kind]  # steps 2, 4: models/ + ema/ (or D); + the exported or copied AE
    assert len(weights) == expected, sorted(first)
    assert "metrics.csv" in first and any(f.endswith("optimizers.pt") for f in first)
    assert any(f.endswith("rng/rank0.pt") for f in first)
    different = sorted(f for f in first.keys() | second.keys() if first.get(f) != second.get(f))
    assert not different, f"{kind}: files that differ between two runs of the same config and seed: {different}"
