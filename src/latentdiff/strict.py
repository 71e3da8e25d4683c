"""Building a config dataclass from a plain mapping (YAML, JSON) where an unknown key is an error."""

from __future__ import annotations

import dataclasses


def strict_from_dict(cls, d: dict):
    """``cls(**d)`` for dataclass ``cls``; keys that are not its fields raise a ValueError naming them and the
    known ones (the class's own checks then run in its ``__post_init__``)."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {names}")
    return cls(**d)
