"""Errors the user caused: a config, a data folder, a checkpoint or a request that cannot be used.

They all derive from :class:`UserError`, which the command line prints as one line (exit status 2); any other
exception is a bug and keeps its traceback. Each class also derives from the built-in exception that code
caught before it existed (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user; the message names the file, key, option or value at fault."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the file (or override) and the key."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value of the wrong type."""


class DataError(UserError, ValueError):
    """A dataset or image folder that cannot be read as asked: no images, a bad metadata line, a bad option."""


class CheckpointError(UserError, ValueError):
    """A run, model or checkpoint folder that is missing, truncated, corrupt or of another kind."""


class RequestError(UserError, ValueError):
    """Options of a call (sampling, evaluation, a command's arguments) that are out of range or do not fit."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that the user named (or that a folder should hold) does not exist."""
