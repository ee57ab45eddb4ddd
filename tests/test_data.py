"""Dataset discovery and splitting, on tiny synthetic images written with PIL."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from multiscale_dali.constants import IMAGE_EXTENSIONS, SPLIT_NAMES
from multiscale_dali.data.discovery import (
    DataError,
    DatasetSplits,
    SplitFiles,
    discover_dataset,
    is_image_file,
    stratified_split_counts,
    validate_fractions,
)

TINY_SIDE = 4


def _write_image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (TINY_SIDE, TINY_SIDE), (value, value, value)).save(path, "JPEG")
    return path


def _make_class_folders(folder: Path, counts: dict[str, int], ext: str = ".jpg") -> None:
    for name, n in counts.items():
        for i in range(n):
            _write_image(folder / name / f"{name}_{i:03d}{ext}", value=(i * 37) % 256)


def _all_files(splits: DatasetSplits) -> list[str]:
    return [f for name in SPLIT_NAMES for f in splits.split(name).files]


def _label_of(splits: DatasetSplits) -> dict[str, str]:
    """Map every file to its class name, across all splits."""
    return {
        f: splits.classes[label]
        for name in SPLIT_NAMES
        for f, label in zip(splits.split(name).files, splits.split(name).labels)
    }


# --- layout (a): explicit split folders ---------------------------------------------------------


def test_explicit_layout_reads_each_split_folder_with_shared_class_mapping(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"cat": 3, "dog": 2, "ant": 1})
    _make_class_folders(tmp_path / "val", {"dog": 1, "cat": 1})
    _make_class_folders(tmp_path / "test", {"ant": 2})

    splits = discover_dataset(tmp_path)

    assert splits.explicit_splits is True
    assert splits.classes == ("ant", "cat", "dog")
    assert splits.num_classes == 3
    assert splits.root == str(tmp_path.resolve())
    assert splits.train.class_counts(3) == [1, 3, 2]
    assert splits.val.class_counts(3) == [0, 1, 1]
    assert splits.test.class_counts(3) == [2, 0, 0]
    # The label of every file is the index of its class folder, in every split.
    for f, cls in _label_of(splits).items():
        assert Path(f).parent.name == cls
        assert os.path.isabs(f)


def test_explicit_layout_files_are_sorted_and_grouped_by_class(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"b": 3, "a": 3})
    _make_class_folders(tmp_path / "val", {"a": 1, "b": 1})
    _make_class_folders(tmp_path / "test", {"a": 1, "b": 1})

    train = discover_dataset(tmp_path).train

    assert list(train.files) == sorted(train.files)
    assert train.labels == (0, 0, 0, 1, 1, 1)


def test_class_folder_in_val_not_in_train_is_an_error_naming_it(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    _make_class_folders(tmp_path / "val", {"cat": 1, "zebra": 1})

    with pytest.raises(DataError, match="zebra") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path / "val") in str(info.value)


def test_split_folders_without_train_folder_is_an_error(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "val", {"cat": 1, "dog": 1})

    with pytest.raises(DataError, match="no 'train' folder") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_val_and_test_are_carved_out_of_train_stratified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _make_class_folders(tmp_path / "train", {"cat": 10, "dog": 20})

    with caplog.at_level(logging.INFO, logger="multiscale_dali.data.discovery"):
        splits = discover_dataset(tmp_path, fractions=(0.8, 0.1, 0.1), seed=3)

    assert splits.explicit_splits is False
    assert splits.train.class_counts(2) == [8, 16]
    assert splits.val.class_counts(2) == [1, 2]
    assert splits.test.class_counts(2) == [1, 2]
    assert "carving" in caplog.text and str(tmp_path / "train") in caplog.text


def test_only_missing_test_is_carved_and_existing_val_is_kept(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"cat": 9, "dog": 9})
    _make_class_folders(tmp_path / "val", {"cat": 2, "dog": 2})

    splits = discover_dataset(tmp_path, fractions=(0.6, 0.2, 0.2))

    assert splits.explicit_splits is False
    assert all(Path(f).parts[-3] == "val" for f in splits.val.files)
    assert splits.val.class_counts(2) == [2, 2]
    # train:test = 0.6:0.2 of the 9 train files of each class -> 7 / 2 (6.75 / 2.25 rounded).
    assert splits.train.class_counts(2) == [7, 7]
    assert splits.test.class_counts(2) == [2, 2]
    assert all(Path(f).parts[-3] == "train" for f in splits.test.files)


def test_carving_tiny_classes_still_fills_every_held_out_split(tmp_path: Path) -> None:
    # Two files per class is below the per-class guarantee, but a class can still spare one.
    _make_class_folders(tmp_path / "train", {"cat": 2, "dog": 2})

    splits = discover_dataset(tmp_path)

    assert len(splits.val) >= 1 and len(splits.test) >= 1
    assert all(c >= 1 for c in splits.train.class_counts(2))


# --- layout (b): class folders at the root --------------------------------------------------------


def test_flat_layout_is_split_by_fractions_per_class(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"cat": 10, "dog": 30})

    splits = discover_dataset(tmp_path, fractions=(0.6, 0.2, 0.2))

    assert splits.explicit_splits is False
    assert splits.classes == ("cat", "dog")
    assert splits.train.class_counts(2) == [6, 18]
    assert splits.val.class_counts(2) == [2, 6]
    assert splits.test.class_counts(2) == [2, 6]


def test_splits_are_disjoint_and_cover_every_file(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 7, "b": 11, "c": 5})

    splits = discover_dataset(tmp_path, seed=5)

    files = _all_files(splits)
    assert len(files) == len(set(files)) == 23
    on_disk = {str(p) for p in tmp_path.rglob("*.jpg")}
    assert set(files) == on_disk
    for f, cls in _label_of(splits).items():
        assert Path(f).parent.name == cls


def test_every_class_keeps_one_train_and_gets_val_and_test_when_it_has_three_files(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 3, "b": 4, "c": 1, "d": 40})

    splits = discover_dataset(tmp_path, fractions=(0.9, 0.05, 0.05))

    assert splits.train.class_counts(4) == [1, 2, 1, 36]
    assert splits.val.class_counts(4) == [1, 1, 0, 2]
    assert splits.test.class_counts(4) == [1, 1, 0, 2]


def test_zero_fraction_leaves_that_split_empty(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 5, "b": 5})

    splits = discover_dataset(tmp_path, fractions=(0.8, 0.2, 0.0))

    assert len(splits.test) == 0
    assert len(splits.train) + len(splits.val) == 10


def test_same_seed_gives_same_split(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 20, "b": 20})

    first = discover_dataset(tmp_path, seed=7)
    second = discover_dataset(tmp_path, seed=7)

    assert first == second


def test_different_seed_gives_different_split(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 20, "b": 20})

    first = discover_dataset(tmp_path, seed=0)
    second = discover_dataset(tmp_path, seed=1)

    assert first.train.class_counts(2) == second.train.class_counts(2)
    assert set(first.val.files) != set(second.val.files)


def test_split_of_a_class_does_not_change_when_another_class_is_added(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"b": 20, "c": 20})
    before = discover_dataset(tmp_path, seed=2)
    _make_class_folders(tmp_path, {"a": 20})  # sorts first, so every label index shifts

    after = discover_dataset(tmp_path, seed=2)

    def val_of(splits: DatasetSplits, cls: str) -> set[str]:
        return {f for f in splits.val.files if Path(f).parent.name == cls}

    assert val_of(before, "b") == val_of(after, "b")
    assert val_of(before, "c") == val_of(after, "c")


# --- files and folders that are skipped ---------------------------------------------------------


def test_extensions_are_filtered_case_insensitively(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"a": 1, "b": 1})
    _write_image(tmp_path / "train" / "a" / "UPPER.JPG")
    _write_image(tmp_path / "train" / "a" / "mixed.JpEg")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / "labels.csv").write_text("x")

    names = {Path(f).name for f in _all_files(discover_dataset(tmp_path))}

    assert {"UPPER.JPG", "mixed.JpEg", "a_000.jpg", "b_000.jpg"} <= names
    assert "notes.txt" not in names and "labels.csv" not in names


def test_hidden_files_and_folders_are_ignored(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"a": 1, "b": 1})
    _write_image(tmp_path / "train" / "a" / ".hidden.jpg")
    _write_image(tmp_path / "train" / ".cache" / "x.jpg")  # would be an empty-ish extra class
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # empty and hidden: not an error

    splits = discover_dataset(tmp_path)

    assert splits.classes == ("a", "b")
    assert not any(Path(f).name.startswith(".") for f in _all_files(splits))


def test_images_in_nested_subfolders_of_a_class_are_found(tmp_path: Path) -> None:
    # As torchvision's ImageFolder does.
    _make_class_folders(tmp_path / "train", {"a": 1, "b": 1})
    nested = _write_image(tmp_path / "train" / "a" / "sub" / "deep.png")

    splits = discover_dataset(tmp_path)

    index = splits.train.files.index(str(nested))
    assert splits.classes[splits.train.labels[index]] == "a"


def test_is_image_file() -> None:
    assert is_image_file("x.jpg") and is_image_file("X.JPG") and is_image_file("y.Png")
    assert not is_image_file("notes.txt") and not is_image_file(".x.jpg") and not is_image_file("jpg")
    # The same answer as the extension rule it implements (os.path.splitext), on awkward names.
    for name in ("a.b.JPEG", "a.jpg.txt", "a..png", "tif", "a.tiff", "a.TIF ", "a.", "x.webp", "x.jpgx"):
        expected = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        assert is_image_file(name) == expected, name


def test_symlinked_folders_are_followed_but_a_loop_lists_each_file_once(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 2, "b": 2})
    elsewhere = tmp_path.parent / f"{tmp_path.name}_extra"
    _write_image(elsewhere / "linked.jpg")
    os.symlink(elsewhere, tmp_path / "a" / "extra")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")

    files = _all_files(discover_dataset(tmp_path))

    assert sum(1 for f in files if f.endswith("linked.jpg")) == 1
    assert len(files) == 5


# --- errors name the bad folder ------------------------------------------------------------------


def test_missing_root_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        discover_dataset(missing)
    assert str(missing) in str(info.value)


def test_root_that_is_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _write_image(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="not a directory") as info:
        discover_dataset(path)
    assert str(path) in str(info.value)


def test_root_without_class_folders_is_an_error_naming_it(tmp_path: Path) -> None:
    _write_image(tmp_path / "loose.jpg")
    with pytest.raises(DataError, match="no class folders") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "subfolder per class" in str(info.value)


def test_train_folder_without_class_folders_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path / "train") in str(info.value)


def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("no images here")

    with pytest.raises(DataError, match="no image files") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path / "empty_class") in str(info.value)
    assert "1 other file" in str(info.value)


def test_empty_class_folder_in_val_is_an_error_naming_it(tmp_path: Path) -> None:
    _make_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _make_class_folders(tmp_path / "val", {"a": 1})
    (tmp_path / "val" / "b").mkdir()

    with pytest.raises(DataError) as info:
        discover_dataset(tmp_path)
    assert str(tmp_path / "val" / "b") in str(info.value)


def test_single_class_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"only": 3})
    with pytest.raises(DataError, match="at least 2") as info:
        discover_dataset(tmp_path)
    assert str(tmp_path) in str(info.value) and "only" in str(info.value)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --- argument validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fractions", "fragment"),
    [
        ((0.5, 0.5), "three numbers"),
        ((0.8, 0.1, 0.2), "sum to 1"),
        ((1.1, -0.05, -0.05), ">= 0"),
        ((0.0, 0.5, 0.5), "train fraction must be > 0"),
        ((float("nan"), 0.5, 0.5), "finite"),
        (("0.8", 0.1, 0.1), "must be a number"),
    ],
)
def test_bad_fractions_are_rejected_naming_the_value(
    tmp_path: Path, fractions: tuple, fragment: str
) -> None:
    _make_class_folders(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=fragment) as info:
        discover_dataset(tmp_path, fractions=fractions)
    assert repr(tuple(fractions)) in str(info.value)


def test_fractions_within_tolerance_are_accepted() -> None:
    assert validate_fractions((0.7, 0.2, 0.1 + 5e-7)) == (0.7, 0.2, 0.1 + 5e-7)
    assert validate_fractions([1, 0, 0]) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_rejected(tmp_path: Path, seed: object) -> None:
    _make_class_folders(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="seed"):
        discover_dataset(tmp_path, seed=seed)  # type: ignore[arg-type]


# --- split counts and result types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (0, (0.8, 0.1, 0.1), (0, 0, 0)),
        (1, (0.1, 0.45, 0.45), (1, 0, 0)),
        (2, (0.1, 0.45, 0.45), (1, 0, 1)),
        (3, (0.98, 0.01, 0.01), (1, 1, 1)),
        (10, (0.8, 0.1, 0.1), (8, 1, 1)),
        (100, (0.71, 0.29, 0.0), (71, 29, 0)),
        (7, (1.0, 0.0, 0.0), (7, 0, 0)),
    ],
)
def test_stratified_split_counts(n: int, fractions: tuple, expected: tuple) -> None:
    assert stratified_split_counts(n, fractions) == expected


def test_stratified_split_counts_always_add_up_and_keep_one_train_sample() -> None:
    for n in range(0, 40):
        for fractions in [(0.8, 0.1, 0.1), (0.34, 0.33, 0.33), (0.05, 0.9, 0.05), (0.5, 0.5, 0.0)]:
            counts = stratified_split_counts(n, fractions)
            assert sum(counts) == n
            assert n == 0 or counts[0] >= 1
            if n >= 3:
                assert all(c >= 1 for c, f in zip(counts[1:], fractions[1:]) if f > 0)


def test_summary_is_json_able_with_counts_per_split_and_class(tmp_path: Path) -> None:
    import json

    _make_class_folders(tmp_path, {"a": 10, "b": 10})
    splits = discover_dataset(tmp_path)

    summary = json.loads(json.dumps(splits.summary()))

    assert summary["classes"] == ["a", "b"]
    assert summary["num_classes"] == 2
    assert summary["explicit_splits"] is False
    assert summary["splits"]["train"] == {"total": 16, "per_class": {"a": 8, "b": 8}}
    assert sum(summary["splits"][name]["total"] for name in SPLIT_NAMES) == 20


def test_split_by_name_and_unknown_name(tmp_path: Path) -> None:
    _make_class_folders(tmp_path, {"a": 3, "b": 3})
    splits = discover_dataset(tmp_path)

    assert splits.split("val") is splits.val
    with pytest.raises(ValueError, match="'validation'"):
        splits.split("validation")


def test_split_files_checks_lengths_and_counts_classes() -> None:
    with pytest.raises(ValueError, match="2 files but 1 labels"):
        SplitFiles(files=("a", "b"), labels=(0,))
    split = SplitFiles(files=("a", "b", "c"), labels=(1, 1, 0))
    assert len(split) == 3
    assert split.class_counts(3) == [1, 2, 0]
    with pytest.raises(ValueError, match="label 1"):
        split.class_counts(1)
