"""train.compile / train.channels_last / sample.compile / sample.channels_last change speed, not results; the
compile time is reported apart; FSDP is refused with a clear error (accelerate cannot run it on CPU)."""

from types import SimpleNamespace

import pytest
import torch
from test_text_to_image import (  # noqa: F401
    ROOT,
    _cache_dir,
    first_stage,
    text_run,  # noqa: F401  (a fixture)
    text_yaml,
)

from latentdiff.config import ConfigError, TrainConfig, load_config
from latentdiff.nn import speed
from latentdiff.nn.speed import FirstCallTimer, optimize, unoptimized
from latentdiff.pipeline import Pipeline
from latentdiff.train import train
from latentdiff.train.loop import _check_distributed_type

from helpers.train_tiny import ToyImages, make_objective

BASE = dict(steps=3, batch_size=8, lr=1e-3, checkpoint_every=0, log_every=1, ema_decay=0.0, seed=0,
            mixed_precision="no")


def _trained(tmp_path, name, **kw):
    obj = make_objective(cond_drop_prob=0.0)
    train(obj, ToyImages(n=32), TrainConfig(**BASE, **kw), tmp_path / name, progress=False)
    return {k: v.clone() for k, v in obj.models["unet"].state_dict().items()}


def test_channels_last_and_compile_train_the_same_weights(tmp_path, capsys):
    plain = _trained(tmp_path, "plain")
    nhwc = _trained(tmp_path, "nhwc", channels_last=True)
    compiled = _trained(tmp_path, "compiled", compile=True, compile_backend="eager")
    assert "compile: first step" in capsys.readouterr().out
    for other in (nhwc, compiled):
        assert other.keys() == plain.keys()
        for k in plain:
            torch.testing.assert_close(other[k].contiguous(), plain[k], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(plain[k], make_objective().models["unet"].state_dict()[k]) for k in plain)


def test_optimize_wraps_and_unwraps():
    net = torch.nn.Conv2d(2, 2, 3)
    fast = optimize(net, compile=True, channels_last=True, backend="eager")
    assert unoptimized(fast) is net and net.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimize(net) is net
    with pytest.raises(ValueError, match="unknown compile backend"):
        optimize(net, compile=True, backend="nope")


def test_first_call_timer():
    t = FirstCallTimer()
    for s in (5.0, 1.0, 2.0):
        t.record(s)
    assert (t.first_s, t.steady_s, t.compile_s) == (5.0, 1.5, 3.5)


def test_sampling_with_compile_and_channels_last_gives_the_same_images(monkeypatch):
    compiled, real_compile = [], torch.compile

    def eager_compile(module, backend="inductor"):
        compiled.append(module)
        return real_compile(module, backend="eager")  # inductor's code generation takes minutes here

    monkeypatch.setattr(speed.torch, "compile", eager_compile)
    config = load_config(ROOT / "configs" / "tiny_test.yaml", ["data.channels=1"])
    torch.manual_seed(0)
    pipe = Pipeline.from_config(config)
    ref = pipe.sample(2, steps=3, output="tensor")
    fast = Pipeline(pipe.unet, pipe.diffusion, load_config(ROOT / "configs" / "tiny_test.yaml", [
        "data.channels=1", "sample.compile=true", "sample.channels_last=true"]))
    torch.testing.assert_close(fast.sample(2, steps=3, output="tensor"), ref, atol=1e-5, rtol=1e-4)
    assert compiled == [pipe.unet]
    fast.sample(2, steps=3, output="tensor")
    assert len(compiled) == 1  # compiled once, reused


def test_fsdp_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="FSDP.*--multi_gpu"):
        _check_distributed_type(SimpleNamespace(distributed_type="DistributedType.FSDP"))
    _check_distributed_type(SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"))


def test_repeated_prompts_are_encoded_once(text_run):  # noqa: F811
    from latentdiff.pipeline import load

    pipe = load(text_run)
    calls = []
    inner = pipe.conditioner.forward
    pipe.conditioner.forward = lambda batch: calls.append(list(batch["prompt"])) or inner(batch)
    prompts = ["a red circle at the top left", "a blue square in the centre"]
    images = pipe.sample(6, prompts=prompts, guidance=2.0, steps=2, batch_size=2, output="tensor")
    assert sorted(map(tuple, calls)) == sorted([("",), (prompts[0],), (prompts[1],)])  # 3 batches, each once
    pipe._prompt_cache.clear()
    pipe.conditioner.forward = inner
    again = pipe.sample(6, prompts=prompts, guidance=2.0, steps=2, batch_size=3, output="tensor")
    torch.testing.assert_close(again, images, atol=1e-5, rtol=1e-4)  # the batch size changes nothing
