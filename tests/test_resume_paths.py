"""Resume compares --data as a place on disk, not as a string, and refuses a dataset that changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from conftest import make_jpeg_folder, synthetic_image
from multiscale_dali.cli.main import main

SMALL = ["--scales", "32", "--batch-size", "4", "--workers", "0", "--backend", "torchvision", "--epochs", "1"]


def _train(*args: str) -> Result:
    return CliRunner().invoke(main, ["train", *args])


@pytest.fixture
def relative_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-epoch run trained from ``tmp_path`` with ``--data images`` (a relative path)."""
    make_jpeg_folder(tmp_path / "images", classes=2, per_class=5, sizes=[(40, 40)])
    monkeypatch.chdir(tmp_path)
    result = _train("--data", "images", "--out", "run", *SMALL)
    assert result.exit_code == 0, result.output
    return tmp_path


def test_resume_accepts_the_same_dataset_spelled_another_way_from_anywhere(relative_run: Path, monkeypatch):
    result = _train("--data", str(relative_run / "images") + "/", "--out", "run", "--resume", "auto", *SMALL)
    assert result.exit_code == 0, result.output
    elsewhere = relative_run / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no --data: the checkpoint's relative "images" would be wrong here
    result = _train("--out", str(relative_run / "run"), "--resume", "auto")
    assert result.exit_code == 0, result.output


def test_resume_refuses_another_dataset_or_one_that_changed(relative_run: Path):
    shutil.copytree(relative_run / "images", relative_run / "copy")
    result = _train("--data", "copy", "--out", "run", "--resume", "auto", *SMALL)
    assert result.exit_code == 2 and "--data" in result.output, result.output
    Image.fromarray(synthetic_image(40, 40, seed=99)).save(relative_run / "images" / "class_0" / "new.jpg")
    result = _train("--data", "images", "--out", "run", "--resume", "auto", *SMALL)
    assert result.exit_code == 2 and "--data" in result.output and "changed since" in result.output, result.output
