"""Files written all or nothing: a temporary file in the same folder, then os.replace; and JSON files read back.

A reader never sees a half-written file, and an error (or an interrupt) while writing leaves the previous
file, if any, untouched and no temporary file behind. ``read_json`` turns a file that is not JSON (truncated,
another format, not UTF-8) into the caller's error type, naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Fill ``path`` through ``write(tmp)``, which writes the whole content to the temporary path ``tmp``; then
    replace ``path`` with it (mode 0644). Creates the folder when missing. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def read_json(path, error: type[Exception] = ValueError, expect: type | None = dict):
    """The JSON value in the file ``path``; a file that is not JSON, or whose value is not an ``expect`` (None:
    anything), is an ``error`` naming it (the caller's type: a bad checkpoint, a bad request, ...). A missing file
    is the caller's to check (its message says what the file is for)."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected {_JSON_NAMES.get(expect, expect.__name__)} in JSON, got "
                    f"{_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value
