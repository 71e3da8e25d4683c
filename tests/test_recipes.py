"""The shipped recipes: found by name or path, listed with a line each, and present in an installed wheel."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from latentdiff.errors import MissingFileError, UserError
from latentdiff.recipes import RECIPES, describe, find_recipe, list_recipes, recipe_names

from helpers.clitools import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_is_listed_with_its_first_comment_line():
    names = [p.stem for p in sorted(RECIPES.glob("*.yaml"))]
    assert "tiny_test" in names and "digits_ddpm" in names
    listed = list_recipes()
    assert [n for n, _ in listed] == names == recipe_names()
    for name, description in listed:
        first = (RECIPES / f"{name}.yaml").read_text().splitlines()[0]
        assert description and "\n" not in description and first == f"# {description}", name
        assert isinstance(yaml.safe_load((RECIPES / f"{name}.yaml").read_text()), dict)


def test_describe_reads_the_first_comment_line_only(tmp_path):
    (tmp_path / "a.yaml").write_text("\n#   Two spaces in.  \n# second\nmodel: {}\n")
    (tmp_path / "b.yaml").write_text("model: {}  # not a heading\n")
    assert describe(tmp_path / "a.yaml") == "Two spaces in."
    assert describe(tmp_path / "b.yaml") == ""


def test_the_configs_folder_of_a_checkout_is_the_recipes():
    assert (ROOT / "configs" / "tiny_test.yaml").resolve() == (RECIPES / "tiny_test.yaml").resolve()


def test_find_recipe_by_name_with_or_without_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("tiny_test") == RECIPES / "tiny_test.yaml"
    assert find_recipe("tiny_test.yaml") == RECIPES / "tiny_test.yaml"


def test_an_existing_file_wins_over_a_recipe_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_test.yaml").write_text("# mine\n")
    assert find_recipe("tiny_test.yaml") == Path("tiny_test.yaml")
    assert find_recipe("tiny_test") == RECIPES / "tiny_test.yaml"  # no file of that exact name here
    assert find_recipe(tmp_path / "tiny_test.yaml") == tmp_path / "tiny_test.yaml"


@pytest.mark.parametrize(("arg", "hint"), [("tiny_tset", "'tiny_test'"),
                                          ("elsewhere/digits_ddpm.yaml", "'digits_ddpm'"), ("zzz", None)])
def test_an_unknown_name_lists_the_recipes_and_the_nearest(tmp_path, monkeypatch, arg, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError) as info:
        find_recipe(arg)
    text = str(info.value)
    assert isinstance(info.value, UserError) and arg in text and "not found" in text
    assert all(name in text for name in recipe_names())
    assert ("did you mean" in text) == (hint is not None) and (hint is None or hint in text)


def test_the_command_lists_one_line_per_recipe(capsys):
    rc, out, err = run_cli(capsys, "recipes")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == recipe_names()
    assert all(description in line for line, (_, description) in zip(lines, list_recipes(), strict=True))


def test_train_by_an_unknown_name_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "train", "tiny_tst", "--out", tmp_path / "run")
    assert rc == 2 and "did you mean the recipe 'tiny_test'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# An installed wheel, outside the checkout


def _run(args, cwd, env, timeout=240):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.timeout(300)
def test_the_wheel_ships_the_recipes_and_trains_one_by_name_from_anywhere(tmp_path):
    # Build from a copy of the sources, so that the build leaves nothing (build/, *.egg-info) in the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    _run(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist",
          source], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("latentdiff-*.whl")
    site = tmp_path / "site"
    _run(["-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, wheel], cwd=tmp_path, env=env)
    assert (site / "latentdiff" / "recipes" / "tiny_test.yaml").is_file()

    # torch and the rest come from this interpreter's site-packages; latentdiff only from the installed wheel.
    work = tmp_path / "work"
    work.mkdir()
    env["PYTHONPATH"] = str(site)
    where = _run(["-c", "import latentdiff; print(latentdiff.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).resolve().is_relative_to(site.resolve()), where
    listed = _run(["-m", "latentdiff.cli", "recipes"], cwd=work, env=env)
    assert [line.split()[0] for line in listed.splitlines()] == recipe_names()
    out = _run(["-m", "latentdiff.cli", "train", "tiny_test", "train.steps=2", "--out", work / "run", "--quiet"],
               cwd=work, env=env)
    assert "trained to step 2" in out, out
    assert (work / "run" / "config.yaml").is_file()
