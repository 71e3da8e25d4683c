"""No code from files (issue 17, item 6): no user-supplied file is ever unpickled or executed.

A scan of the source (src/ and benchmarks/, parsed with ``ast``) fails on every ``pickle`` / ``marshal`` /
``shelve`` / ``dill`` / ``joblib`` load or Unpickler, ``torch.load`` without a literal ``weights_only=True``,
``torch.jit.load``, ``yaml.load`` / ``unsafe_load`` / ``full_load``, ``numpy.load`` with ``allow_pickle=True``,
and builtin ``eval`` / ``exec`` / ``compile`` / ``__import__``, unless it is on the short allow-list below (each
entry says why it is safe; an entry that no longer matches fails too, so the list stays short and true). The
scanner is tested on a snippet holding every forbidden form. Then crafted files: a checkpoint whose .pt files
run code when unpickled, and configs with Python tags, are refused with one line and run nothing."""

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from latentdiff.train import CheckpointError, TrainConfig, train
from latentdiff.train.checkpoint import STATE_HASH, state_hash

from helpers.clitools import run_cli
from helpers.train_tiny import ToyImages, make_objective

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "src", ROOT / "benchmarks"]

# (file relative to the repository, forbidden form): why it is safe. Keep this short.
ALLOWED = {
    ("src/latentdiff/config.py", "yaml.load"):
        "Loader=_UniqueKeyLoader, a yaml.SafeLoader subclass that only adds a duplicate-key error",
    ("src/latentdiff/data/cifar10.py", "pickle.Unpickler"):
        "RestrictedUnpickler: find_class resolves only numpy's array globals; anything else is refused",
}

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}
BUILTINS = {"eval", "exec", "compile", "__import__"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def scan(source: str) -> list[tuple[int, str]]:
    """(line, forbidden form) of every dangerous use in Python ``source``."""
    found = []
    aliases = {}  # local name -> module, from `import x as y` / `from x import y`
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = _resolve(_dotted(base), aliases)
                if name.split(".")[0] in PICKLE_MODULES and name.endswith("Unpickler"):
                    found.append((node.lineno, "pickle.Unpickler"))
        if not isinstance(node, ast.Call):
            continue
        name = _resolve(_dotted(node.func), aliases)
        head, _, last = name.rpartition(".")
        if isinstance(node.func, ast.Name) and node.func.id in BUILTINS and node.func.id not in aliases:
            found.append((node.lineno, node.func.id))
        elif head.split(".")[0] in PICKLE_MODULES and (last.startswith("load") or last in ("Unpickler", "open")):
            found.append((node.lineno, "pickle.Unpickler" if last == "Unpickler" else "pickle.load"))
        elif name == "torch.load" and not _kw_is(node, "weights_only", True):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "torch.jit.load":
            found.append((node.lineno, "torch.jit.load"))
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                      "yaml.full_load_all"):
            found.append((node.lineno, "yaml.load" if name == "yaml.load" else name))
        elif name in ("numpy.load", "np.load") and _kw_is(node, "allow_pickle", True):
            found.append((node.lineno, "numpy.load with allow_pickle=True"))
    return sorted(found)


def _resolve(name: str, aliases: dict) -> str:
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    full = {"np": "numpy"}.get(full, full)
    return f"{full}.{rest}" if rest else full


def test_the_scanner_finds_every_forbidden_form():
    snippet = """
import pickle, marshal, yaml, torch, numpy as np
import pickle as pk
from pickle import loads
from torch import load as tload
pickle.load(f); pk.loads(b); loads(b); marshal.loads(b)
class U(pickle.Unpickler): pass
torch.load(p); torch.load(p, weights_only=False); tload(p); torch.jit.load(p)
yaml.load(t); yaml.unsafe_load(t); yaml.full_load(t)
np.load(p, allow_pickle=True)
eval("1"); exec("x = 1"); compile("1", "f", "eval"); __import__("os")
torch.load(p, weights_only=True); yaml.safe_load(t); np.load(p); model.eval()
"""
    forms = [form for _, form in scan(snippet)]
    assert forms.count("pickle.load") == 4 and forms.count("pickle.Unpickler") == 1
    assert forms.count("torch.load without weights_only=True") == 3 and "torch.jit.load" in forms
    assert {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "numpy.load with allow_pickle=True"} <= set(forms)
    assert {"eval", "exec", "compile", "__import__"} <= set(forms)
    assert len(forms) == 17  # the safe forms of the last line are not reported


def test_no_file_is_unpickled_or_executed_outside_the_allow_list():
    used, bad = set(), []
    files = [p for root in SCANNED for p in sorted(root.rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for line, form in scan(path.read_text(encoding="utf-8")):
            if (rel, form) in ALLOWED:
                used.add((rel, form))
            else:
                bad.append(f"{rel}:{line}: {form}")
    assert not bad, "code could run from a file: " + "; ".join(bad)
    assert used == set(ALLOWED), f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_the_allowed_yaml_loader_is_a_safe_loader():
    import yaml

    from latentdiff.config import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)


# ----------------------------------------------------------------------------------------------------------
# Crafted files


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("target", ["optimizers.pt", "objective.pt", "rng/rank0.pt"])
def test_a_checkpoint_crafted_to_run_code_is_refused(target, tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, checkpoint_every=2, log_every=1, ema_decay=0.9, seed=1)
    run = tmp_path / "run"
    train(make_objective(T=10, sampler="loss_second_moment"), ToyImages(n=16), cfg, run, progress=False)
    ckpt = run / "checkpoints" / "step_0000002"
    marker = tmp_path / "code_ran"
    torch.save({"state": _Payload(marker)}, ckpt / target)
    # The attacker also rewrites the manifest, so that the checksums agree.
    state = json.loads((ckpt / "state.json").read_text())
    data = (ckpt / target).read_bytes()
    state["files"][target] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state[STATE_HASH] = state_hash(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint file {ckpt / target}: .*") as err:
        train(make_objective(T=10, sampler="loss_second_moment"), ToyImages(n=16),
              TrainConfig(**{**cfg.to_dict(), "steps": 4}), run, resume=ckpt, progress=False)
    assert "\n" not in str(err.value) and "refused without running it" in str(err.value)
    assert not marker.exists(), "unpickling the checkpoint ran code"


def test_a_checkpoint_crafted_to_run_code_is_refused_by_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = ROOT / "configs" / "tiny_test.yaml"
    assert run_cli(capsys, "train", cfg, "--out", run, "--quiet", "train.steps=2")[0] == 0
    ckpt = run / "checkpoints" / "step_0000002"
    marker = tmp_path / "code_ran"
    torch.save(_Payload(marker), ckpt / "optimizers.pt")
    state = json.loads((ckpt / "state.json").read_text())
    data = (ckpt / "optimizers.pt").read_bytes()
    state["files"]["optimizers.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state[STATE_HASH] = state_hash(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    rc, out, err = run_cli(capsys, "train", cfg, "--out", run, "--quiet", "--resume", "train.steps=4")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"cannot read checkpoint file {ckpt / 'optimizers.pt'}" in err
    assert not marker.exists()


TAGS = ["!!python/object/apply:os.mkdir [MARKER]", "!!python/object/new:os.mkdir [MARKER]",
        "!!python/name:os.system", "!!python/module:os"]


@pytest.mark.parametrize("tag", TAGS)
def test_a_config_with_python_tags_runs_nothing(tag, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    text = (ROOT / "configs" / "tiny_test.yaml").read_text().replace("name: digits", f"name: {tag}")
    text = text.replace("MARKER", str(marker))
    (tmp_path / "evil.yaml").write_text(text)
    rc, out, err = run_cli(capsys, "train", tmp_path / "evil.yaml", "--out", tmp_path / "run", "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "invalid YAML" in err, err
    assert not marker.exists() and not (tmp_path / "run").exists()
    # The same tag in a model folder's config.yaml.
    model = tmp_path / "model"
    shutil.copytree(ROOT / "configs", model, ignore=shutil.ignore_patterns("*"))
    (model / "config.yaml").write_text(text)
    (model / "model.safetensors").write_bytes(b"")
    rc, out, err = run_cli(capsys, "sample", model, "--num", 1, "--out", tmp_path / "x.png")
    assert rc == 2 and "invalid YAML" in err and not marker.exists(), err
