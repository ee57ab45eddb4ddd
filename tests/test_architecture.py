"""The package's layers import one way: cli -> evaluation/benchmark/reporting -> training -> pipelines
-> data/models -> the top-level helpers. The test parses the sources; it runs none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "multiscale_dali"

# A module may import its own subpackage and any subpackage of a lower rank, never a higher or equal one.
RANKS = {
    "<top>": 0,  # constants, errors, extras, fileio: import no subpackage
    "data": 1,
    "models": 1,
    "pipelines": 2,
    "training": 3,
    "evaluation": 4,
    "benchmark": 4,
    "reporting": 4,
    "cli": 5,
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE_ROOT.rglob("*.py"))


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT).parts
    return parts[0] if len(parts) > 1 else "<top>"


def _imported(path: Path) -> set[str]:
    """Every absolute module name imported anywhere in the file (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package uses absolute imports"
            names.add(node.module or "")
    return names


def _target_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "multiscale_dali" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in RANKS else "<top>"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_modules_import_only_lower_layers(path: Path) -> None:
    layer = _layer(path)
    if path.name == "__main__.py" and layer == "<top>":
        layer = "cli"  # `python -m multiscale_dali` is the command line
    for module in _imported(path):
        target = _target_layer(module)
        if target is None or target == layer:
            continue
        assert RANKS[target] < RANKS[layer], f"{path.relative_to(PACKAGE_ROOT)} ({layer}) imports {module} ({target})"


def test_only_the_dali_subpackage_imports_dali() -> None:
    importers = {p for p in _modules() if any(m == "nvidia" or m.startswith("nvidia.") for m in _imported(p))}
    outside = [str(p.relative_to(PACKAGE_ROOT)) for p in importers
               if p.relative_to(PACKAGE_ROOT).parts[:2] != ("pipelines", "dali")]
    assert importers, "the DALI backend should import nvidia.dali"
    assert outside == []


def test_every_subpackage_says_what_lives_there() -> None:
    for init in PACKAGE_ROOT.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_the_direction_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from multiscale_dali.training.trainer import MultiScaleTrainer\n")
    assert "multiscale_dali.training.trainer" in _imported(bad)
    assert RANKS[_target_layer("multiscale_dali.training.trainer")] > RANKS["pipelines"]
