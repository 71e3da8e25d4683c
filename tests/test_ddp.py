"""DDP with 2 CPU processes (gloo) started by `accelerate launch --config_file docs/accelerate/cpu_two_processes.yaml`:
latent text-to-image on streamed latent shards and the autoencoder's GAN objective end with the same weights as one
process with the whole batch (for the stream: one process with 2 loader workers and 2 accumulation steps, which reads
the same shards in the same order). The accelerate configs of docs/scaling.md parse."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_stream_training import TEXT, make_ae, shapes_samples

from latentdiff.data.shards import write_shards

from helpers.clitools import captured
from helpers.ddp_launch_script import run_all

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_shards(shapes_samples(32), root / "shards", shard_size=4)  # 8 shards: 2 processes × up to 4 workers
    make_ae(root / "ae")
    assert captured("encode", root / "shards", "--first-stage", root / "ae", "--out", root / "lat", "--quiet")[0] == 0
    (root / "cfg.yaml").write_text(TEXT)
    return root


def _final(run: Path, name: str) -> dict:
    return load_file(run / "checkpoints" / "step_0000002" / "models" / f"{name}.safetensors")


def test_two_processes_equal_one(root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    config = TESTS.parent / "docs" / "accelerate" / "cpu_two_processes.yaml"  # the config docs/scaling.md gives
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           str(TESTS / "helpers" / "ddp_launch_script.py"), str(root), str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "launched: world=2 backend=gloo" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    run_all(root, tmp_path / "one", "train.num_workers=2", "train.grad_accum=2")
    for run, models in (("txt2img", ("unet", "cond")), ("gan", ("autoencoder", "discriminator"))):
        for name in models:
            a, b = _final(tmp_path / "ddp" / run, name), _final(tmp_path / "one" / run, name)
            worst = max(float((a[k] - b[k]).abs().max()) for k in a)
            print(f"{run}/{name}: max |2 processes - 1 process| = {worst:.2e}")
            assert worst < 1e-5, f"{run}/{name}: 2 processes differ from 1 by {worst}"


@pytest.mark.parametrize("name,kind,processes,machines", [
    ("one_gpu", "NO", 1, 1), ("eight_gpus", "MULTI_GPU", 8, 1), ("two_nodes_fsdp", "FSDP", 16, 2),
    ("cpu_two_processes", "MULTI_GPU", 2, 1)])
def test_the_accelerate_configs_of_the_docs_parse(name, kind, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(TESTS.parent / "docs" / "accelerate" / f"{name}.yaml"))
    assert (str(c.distributed_type).split(".")[-1], c.num_processes, c.num_machines) == (kind, processes, machines)
    if kind == "FSDP":
        assert c.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_encode_under_accelerate_launch_splits_the_shards(root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    config = TESTS.parent / "docs" / "accelerate" / "cpu_two_processes.yaml"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "-m", "latentdiff.cli", "encode", str(root / "shards"), "--first-stage", str(root / "ae"),
                           "--out", str(tmp_path / "lat")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "rank 0/2: encoded 4 shard(s)" in proc.stdout and "rank 1/2: encoded 4 shard(s)" in proc.stdout
    ours = sorted(p.name for p in (tmp_path / "lat").glob("*.tar"))
    assert ours == sorted(p.name for p in (root / "lat").glob("*.tar"))  # all 8, as one process wrote them
    a, b = ((d / "latents-000005.tar").read_bytes() for d in (tmp_path / "lat", root / "lat"))
    assert a == b  # the same bytes whichever process encoded the shard
