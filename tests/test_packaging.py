"""What a non-editable install gets: the wheel carries every module and every recipe, and the recipes
are found by name from a directory that is not the checkout (a container, a cluster node)."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the venv's setuptools, nothing fetched.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("multiscale_dali-*.whl")
    return found


def test_wheel_contains_every_module_and_every_recipe(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "multiscale_dali").rglob("*.py")}
    recipes = {f"multiscale_dali/recipes/{p.name}" for p in (REPO / "pipelines").glob("*.toml")}
    assert recipes, "pipelines/ holds no recipe"
    assert modules - names == set(), "subpackages missing from setup.cfg [options] packages"
    assert recipes - names == set()


def test_recipes_list_and_resolve_by_name_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import multiscale_dali, sys; from multiscale_dali.training.config import load_recipe;"
            "print(multiscale_dali.__file__); print(load_recipe('cpu_smoke')[1]);"
            "sys.argv = ['msdali', 'recipes']; from multiscale_dali.cli.main import main; main()")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(target)), "the installed copy, not the checkout, was imported"
    assert lines[1], "cpu_smoke resolved by name has a description"
    listed = {line.split()[0] for line in lines[2:]}
    assert listed == {p.stem for p in (REPO / "pipelines").glob("*.toml")}


def test_python_requires_admits_no_interpreter_without_tomllib() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    minimum = re.fullmatch(r">=\s*3\.(\d+)", cfg["options"]["python_requires"].strip())
    assert minimum, "python_requires should be a plain lower bound"
    assert int(minimum.group(1)) >= 11  # tomllib and enum.StrEnum are 3.11+


def test_dockerfile_installs_the_package_non_editable() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and not any(" -e " in line or "--editable" in line for line in installs)
