"""Folder symlinks: a loop is walked once, a link back into the dataset never copies images across
classes or splits, and the scan and training read the very same files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_jpeg_folder
from multiscale_dali.data.discovery import DataError, discover_dataset
from multiscale_dali.data.scan import scan_tree


def _files(splits) -> list[str]:
    return sorted(f for name in ("train", "val", "test") for f in splits.split(name).files)


def _image_paths(result) -> list[str]:
    return sorted(r.path for r in result.reports if r.kind != "ignored")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    make_jpeg_folder(root, classes=2, per_class=5, sizes=[(32, 32)])
    return root


def test_a_symlink_loop_inside_a_class_is_not_followed_and_scan_and_train_agree(dataset: Path):
    real = set(_files(discover_dataset(dataset)))
    os.symlink(dataset, dataset / "class_0" / "loop")  # class_0/loop/class_0/loop/... 40 levels deep
    os.symlink("..", dataset / "class_1" / "up")  # class_1/up is class_1 itself
    splits = discover_dataset(dataset)
    assert set(_files(splits)) == real
    labels = dict(zip(splits.train.files + splits.val.files + splits.test.files,
                      splits.train.labels + splits.val.labels + splits.test.labels))
    assert all(labels[f] == int(Path(f).parent.name[-1]) for f in labels)
    assert _image_paths(scan_tree(dataset)) == sorted(real)


def test_a_link_from_train_into_val_does_not_leak_val_images_into_training(tmp_path: Path):
    root = tmp_path / "images"
    make_jpeg_folder(root / "train", classes=2, per_class=4, sizes=[(32, 32)])
    make_jpeg_folder(root / "val", classes=2, per_class=2, sizes=[(32, 32)])
    os.symlink(root / "val" / "class_0", root / "train" / "class_0" / "more")
    splits = discover_dataset(root)
    assert not set(splits.train.files) & {os.path.realpath(f) for f in splits.val.files}
    assert not any("/more/" in f for f in splits.train.files)
    assert _image_paths(scan_tree(root)) == _files(splits)


def test_a_link_to_a_folder_outside_the_dataset_is_still_followed(tmp_path: Path, dataset: Path):
    elsewhere = tmp_path / "extra"
    make_jpeg_folder(elsewhere, classes=1, per_class=3, sizes=[(32, 32)])
    os.symlink(elsewhere / "class_0", dataset / "class_0" / "extra")
    os.symlink(elsewhere, elsewhere / "class_0" / "loop")  # a loop outside the dataset: walked once
    splits = discover_dataset(dataset)
    linked = [f for f in _files(splits) if "/extra/" in f]
    assert len(linked) == 3
    assert _image_paths(scan_tree(dataset)) == _files(splits)


def test_a_class_folder_linking_to_the_dataset_root_is_refused(dataset: Path):
    os.symlink(dataset, dataset / "class_2")
    with pytest.raises(DataError, match="class_2 is a symlink"):
        discover_dataset(dataset)
