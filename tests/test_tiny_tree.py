"""The tiny-JPEG tree generator (multiscale_dali.data.tiny_tree) behind the million-file measurements."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from PIL import Image

from multiscale_dali.data import tiny_tree
from multiscale_dali.data.discovery import discover_dataset
from multiscale_dali.data.scan import scan_tree
from multiscale_dali.data.tiny_tree import class_file_counts, write_tiny_jpeg_tree


def test_files_are_spread_evenly_over_the_classes() -> None:
    assert class_file_counts(10, 3) == (4, 3, 3)
    assert class_file_counts(6, 3) == (2, 2, 2)
    with pytest.raises(ValueError, match="at least one file per class"):
        class_file_counts(2, 3)
    with pytest.raises(ValueError, match="classes"):
        class_file_counts(5, 0)


def test_tree_is_an_image_folder_of_hard_linked_jpegs(tmp_path: Path) -> None:
    tree = write_tiny_jpeg_tree(tmp_path / "t", files=23, classes=4)
    classes = sorted(os.listdir(tree.root))
    assert classes == ["class_0", "class_1", "class_2", "class_3"]
    counts = [len(os.listdir(os.path.join(tree.root, c))) for c in classes]
    assert counts == list(class_file_counts(23, 4)) and tree.files == 23
    assert tree.linked == 23 - 4  # all but the first file of each class
    first = os.path.join(tree.root, "class_0", "img_0.jpg")
    assert os.stat(first).st_nlink == counts[0]
    with Image.open(first) as image:
        assert image.format == "JPEG" and image.size == (16, 16)
    # Classes differ: each has its own colour, hence its own bytes.
    contents = {Path(tree.root, c, "img_0.jpg").read_bytes() for c in classes}
    assert len(contents) == len(classes)

    splits = discover_dataset(tree.root)
    assert splits.classes == tuple(classes)
    assert sum(len(splits.split(n)) for n in ("train", "val", "test")) == 23
    assert scan_tree(tree.root).counts()["ok"] == 23


def test_names_sort_in_numeric_order(tmp_path: Path) -> None:
    tree = write_tiny_jpeg_tree(tmp_path / "t", files=24, classes=2)
    names = sorted(os.listdir(os.path.join(tree.root, "class_0")))
    assert names[:3] == ["img_00.jpg", "img_01.jpg", "img_02.jpg"] and names[-1] == "img_11.jpg"


def test_copies_where_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise OSError(errno.EMLINK, "Too many links")

    monkeypatch.setattr(tiny_tree.os, "link", refuse)
    tree = write_tiny_jpeg_tree(tmp_path / "t", files=6, classes=2)
    assert tree.linked == 0
    assert all(os.stat(p).st_nlink == 1 for p in Path(tree.root).rglob("*.jpg"))
    assert len(list(Path(tree.root).rglob("*.jpg"))) == 6


def test_copies_on_request_and_refuses_a_used_destination(tmp_path: Path) -> None:
    tree = write_tiny_jpeg_tree(tmp_path / "t", files=4, classes=2, link=False)
    assert tree.linked == 0
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_tiny_jpeg_tree(tree.root, files=4, classes=2)
    with pytest.raises(ValueError, match="side"):
        write_tiny_jpeg_tree(tmp_path / "u", files=4, classes=2, side=4)


def test_file_tree_benchmark_times_every_phase_on_a_made_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from multiscale_dali.benchmark import file_tree

    monkeypatch.setenv("MSDALI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "figures.json"
    argv = ["--root", str(tmp_path / "t"), "--make", "--files", "60", "--classes", "3", "--first-scan",
            "--repeat", "2", "--skip", "first_batch", "--out", str(out)]
    assert file_tree.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["files"] == 60 and figures["linked"] == 57
    for phase in ("make", "discover", "fingerprint", "first_scan", "cached_check", "scan_tree"):
        assert figures[f"{phase}_s"] >= 0 and figures[f"{phase}_cpu_s"] >= 0, phase
    assert len(figures["cached_check_runs"]) == 2 and "first_batch_s" not in figures
    assert list((tmp_path / "cache" / "scan").glob("*.json"))  # the first scan filled the cache
