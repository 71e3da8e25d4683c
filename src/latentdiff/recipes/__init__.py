"""The recipes shipped with latentdiff: one YAML run config per file in this folder, installed with the package.

    latentdiff recipes                        # name and one line each
    latentdiff train digits_ddpm              # a recipe by name (``digits_ddpm.yaml`` works too) ...
    latentdiff train my_recipe.yaml           # ... or any config file; an existing file wins over a name

The first comment line of a recipe is its description. Paths inside a recipe (``latent.first_stage:
runs/shapes_vae_kl_f4``) stay relative to the working directory, as for any config file.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import MissingFileError

RECIPES = Path(__file__).resolve().parent
SUFFIX = ".yaml"


def recipe_names() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in RECIPES.glob(f"*{SUFFIX}"))


def describe(path: Path) -> str:
    """The first comment line of a YAML file, without its ``#``; "" when the file starts with no comment."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            return ""
    return ""


def list_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of every shipped recipe, sorted by name."""
    return [(name, describe(RECIPES / f"{name}{SUFFIX}")) for name in recipe_names()]


def find_recipe(name_or_path) -> Path:
    """The config file that ``latentdiff train NAME_OR_PATH`` means: an existing file of that path, else the
    shipped recipe of that name (with or without ``.yaml``; a bare name only, no folder part).

    Raises :class:`~latentdiff.errors.MissingFileError` (a UserError) naming the argument, the nearest recipe
    name and the known ones."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    name = text[: -len(SUFFIX)] if text.endswith(SUFFIX) else text
    names = recipe_names()
    if name in names and path.name == text:
        return RECIPES / f"{name}{SUFFIX}"
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    close = difflib.get_close_matches(stem, names, n=1, cutoff=0.6)
    hint = f" (did you mean the recipe {close[0]!r}?)" if close else ""
    raise MissingFileError(f"config file {text} not found, and it names no shipped recipe{hint}; "
                           f"the recipes are: {', '.join(names)}")
