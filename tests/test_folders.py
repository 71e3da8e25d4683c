"""latentdiff.folders (what a folder is, the newest complete checkpoint) and latentdiff.errors (the UserError
family and how the command prints it)."""

from __future__ import annotations

import json

import pytest

from latentdiff import cli, errors, folders
from latentdiff.folders import AUTOENCODER, AUTOENCODER_RUN, MODEL, RUN, folder_kind


def _write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_folder_kind_tells_the_four_folders_apart(tmp_path):
    _write(tmp_path / "model" / "config.yaml", "model: {preset: tiny}\n")
    _write(tmp_path / "model" / "model.safetensors")
    _write(tmp_path / "run" / "config.yaml", "model: {preset: tiny}\n")
    _write(tmp_path / "ae" / "config.json", json.dumps({"format": folders.AE_FORMAT, "config": {}}))
    _write(tmp_path / "ae_run" / "config.yaml", "autoencoder: {ch: 8}\ndata: {name: shapes}\n")
    _write(tmp_path / "other" / "config.json", json.dumps({"format": "something else"}))
    _write(tmp_path / "broken" / "config.yaml", "autoencoder: [unclosed\n")
    names = ("model", "run", "ae", "ae_run", "other", "broken", "nowhere")
    kinds = {name: folder_kind(tmp_path / name) for name in names}
    assert kinds == {"model": MODEL, "run": RUN, "ae": AUTOENCODER, "ae_run": AUTOENCODER_RUN, "other": None,
                     "broken": RUN, "nowhere": None}  # unreadable YAML: loading it as a config names the problem


def _checkpoint(run, step, files: dict[str, bytes], *, manifest=True):
    ckpt = folders.checkpoint_root(run) / folders.step_name(step)
    for rel, data in files.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(data)
    if manifest:
        listed = {rel: {"size": len(data), "sha256": folders.sha256(ckpt / rel)} for rel, data in files.items()}
        (ckpt / folders.STATE_FILE).write_text(json.dumps({"step": step, "files": listed}))
    return ckpt


def test_checkpoint_weights_takes_the_newest_intact_file_ema_first(tmp_path):
    ema, raw = folders.weights_in_checkpoint("unet", ema=True), folders.weights_in_checkpoint("unet", ema=False)
    old = _checkpoint(tmp_path, 1, {ema: b"ema1", raw: b"raw1"})
    new = _checkpoint(tmp_path, 2, {ema: b"ema2", raw: b"raw2"})
    _checkpoint(tmp_path, 3, {ema: b"ema3"}, manifest=False)  # killed while writing: no state.json
    with pytest.warns(UserWarning, match="step_0000003"):
        assert folders.checkpoint_weights(tmp_path, "unet") == new / ema
    with pytest.warns(UserWarning):
        assert folders.checkpoint_weights(tmp_path, "unet", ema=False) == new / raw
    (new / ema).write_bytes(b"emaX")  # same size, other bytes
    with pytest.warns(UserWarning, match=r"step_0000002/ema/unet.safetensors is corrupt"):
        assert folders.checkpoint_weights(tmp_path, "unet") == old / ema
    with pytest.warns(UserWarning, match="step_0000003"):  # a run folder: its checkpoints
        assert folders.model_weights(tmp_path, "unet", ema=False) == new / raw
    (tmp_path / folders.WEIGHTS_FILE).write_bytes(b"w")
    assert folders.model_weights(tmp_path, "unet") == tmp_path / folders.WEIGHTS_FILE  # a model folder
    with pytest.raises(errors.MissingFileError, match="neither model.safetensors nor a complete checkpoint"):
        folders.checkpoint_weights(tmp_path / "empty", "unet")


def test_user_errors_keep_their_old_bases():
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.ConfigTypeError, TypeError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.RequestError,
                errors.MissingFileError):
        assert issubclass(cls, errors.UserError)
    from latentdiff.config import ConfigError
    from latentdiff.train import CheckpointError

    assert ConfigError is errors.ConfigError and CheckpointError is errors.CheckpointError


def test_the_command_prints_user_errors_in_one_line_and_bugs_with_their_traceback(monkeypatch, capsys):
    def user_error(args):
        raise errors.DataError("no images found under 'x'")

    def bug(args):
        return {}["missing"]

    monkeypatch.setitem(cli.COMMANDS, "oracle", user_error)
    assert cli.main(["oracle", "digits"]) == 2
    assert capsys.readouterr().err == "latentdiff oracle: error: no images found under 'x'\n"
    monkeypatch.setitem(cli.COMMANDS, "oracle", bug)
    with pytest.raises(KeyError, match="missing"):
        cli.main(["oracle", "digits"])
