"""Find the images of an ImageFolder-style dataset and split them into train / val / test.

Two layouts are understood:

(a) ``root/train/<class>/*`` with optional ``root/val/<class>/*`` and ``root/test/<class>/*``;
    a missing val and/or test split is carved out of train with a seeded, stratified split;
(b) ``root/<class>/*``: the whole set is split into train / val / test by ``fractions``.

Both backends receive plain ``(files, labels)`` lists from here instead of pointing their own
readers at the folders: DALI's file reader and torchvision's ImageFolder disagree on edge cases
(an empty class folder keeps its label index in DALI, raises in torchvision), so the decisions are
made once, here, and both backends see the very same samples in the very same order.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from multiscale_dali.errors import UserError
from multiscale_dali.constants import DEFAULT_SPLIT_FRACTIONS, IMAGE_EXTENSIONS, SPLIT_NAMES
from multiscale_dali.data.walk import overlaps_root, walk_dataset

__all__ = [
    "DataError",
    "SplitFiles",
    "DatasetSplits",
    "discover_dataset",
    "is_image_file",
    "validate_fractions",
    "stratified_split_counts",
]

logger = logging.getLogger(__name__)

# How far the three split fractions may stray from summing to exactly 1 (they are often typed as
# decimals such as 0.7 / 0.2 / 0.1 whose float sum is not exactly 1).
FRACTION_SUM_TOLERANCE: float = 1e-6
# A class needs this many files before a non-zero val and test fraction each guarantee it one
# sample: with fewer, guaranteeing both would leave the class without any training sample.
MIN_FILES_FOR_HELD_OUT_GUARANTEE: int = 3
# Training needs something to discriminate between.
MIN_CLASSES: int = 2

_TRAIN, _VAL, _TEST = SPLIT_NAMES
# Lower-case suffixes for str.endswith, which tests a tuple of them in one C call: for a name that
# does not start with a dot this is the same test as os.path.splitext(name)[1].lower() in the set,
# at a fraction of the cost (it runs once per file of a million-file dataset).
_IMAGE_SUFFIXES: tuple[str, ...] = tuple(ext.lower() for ext in IMAGE_EXTENSIONS)


class DataError(UserError, ValueError, flag="--data"):
    """The dataset on disk cannot be used as given; the message names the folder or file."""


@dataclass(frozen=True)
class SplitFiles:
    """The samples of one split: absolute file paths and their class indices, in matching order."""

    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.files)

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of samples of each class index ``0 .. num_classes - 1`` (zeros included)."""
        counts = [0] * num_classes
        for label in self.labels:
            if not 0 <= label < num_classes:
                raise ValueError(f"label {label} is outside 0..{num_classes - 1}")
            counts[label] += 1
        return counts


@dataclass(frozen=True)
class DatasetSplits:
    """Train / val / test samples sharing one class -> index mapping (``classes[i]`` is label ``i``).

    ``explicit_splits`` is True only when all three splits come from folders on disk; it is False
    as soon as any split was carved out by the seeded stratified split (then the split depends on
    ``seed`` and ``fractions``).
    """

    root: str
    classes: tuple[str, ...]
    train: SplitFiles
    val: SplitFiles
    test: SplitFiles
    explicit_splits: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitFiles:
        """The split called ``name`` (one of ``SPLIT_NAMES``)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        """Counts per split and per class, made of plain JSON types (for logs and run metadata)."""
        splits: dict[str, Any] = {}
        for name in SPLIT_NAMES:
            counts = self.split(name).class_counts(self.num_classes)
            splits[name] = {
                "total": sum(counts),
                "per_class": dict(zip(self.classes, counts)),
            }
        return {
            "root": self.root,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "explicit_splits": self.explicit_splits,
            "splits": splits,
        }


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with one of ``IMAGE_EXTENSIONS`` (any letter case)."""
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check train / val / test fractions and return them as a tuple of floats.

    They must be three finite, non-negative numbers summing to 1 (within
    ``FRACTION_SUM_TOLERANCE``) with a positive train fraction.
    """
    try:
        values = tuple(fractions)
    except TypeError:
        raise ValueError(f"fractions must be three numbers (train, val, test), got {fractions!r}") from None
    if len(values) != len(SPLIT_NAMES):
        raise ValueError(f"fractions must be three numbers (train, val, test), got {fractions!r}")
    for name, value in zip(SPLIT_NAMES, values):
        # bool is a Real to Python, but True as a fraction is surely a mistake.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} fraction must be a number, got {value!r} in {fractions!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} fraction must be finite and >= 0, got {value!r} in {fractions!r}")
    total = math.fsum(values)
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {total!r})")
    if values[0] <= 0:
        raise ValueError(f"train fraction must be > 0, got {values[0]!r} in {fractions!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def stratified_split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """How many of a class's ``n`` files go to train / val / test.

    Largest-remainder rounding of ``n * fraction`` (so the counts always add up to ``n``), then:
    at least one train sample whenever ``n >= 1``, and at least one val (test) sample when the val
    (test) fraction is > 0 and ``n >= MIN_FILES_FOR_HELD_OUT_GUARANTEE``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fr = validate_fractions(fractions)
    exact = [n * f for f in fr]
    counts = [math.floor(x) for x in exact]
    # Hand the rounding leftovers to the largest remainders; ties go to the earlier split so the
    # result does not depend on anything but the inputs.
    order = sorted(range(3), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= MIN_FILES_FOR_HELD_OUT_GUARANTEE:
        for i in (1, 2):
            if fr[i] > 0 and counts[i] == 0:
                counts[i] = 1
    # Give train back its minimum of one, taking from the larger held-out split; with
    # n >= MIN_FILES_FOR_HELD_OUT_GUARANTEE that never takes a held-out split below one.
    while n >= 1 and n - counts[1] - counts[2] < 1:
        counts[1 if counts[1] >= counts[2] else 2] -= 1
    counts[0] = n - counts[1] - counts[2]
    return (counts[0], counts[1], counts[2])


def discover_dataset(
    root: str | os.PathLike[str],
    *,
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
) -> DatasetSplits:
    """Scan ``root`` (layout (a) or (b), see the module docstring) and return its three splits.

    Classes are the sorted, non-hidden subfolder names of the train split; every split uses that
    mapping. Image files are those with an extension in ``IMAGE_EXTENSIONS`` (any case), hidden
    files and folders are skipped, and files are sorted, so the result is the same on every run and
    platform. ``fractions`` and ``seed`` only matter where a split has to be carved out.
    """
    fractions = validate_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)

    root_path = Path(os.path.abspath(os.fspath(root)))
    if not root_path.exists():
        raise DataError(f"dataset folder {root_path} does not exist")
    if not root_path.is_dir():
        raise DataError(f"dataset path {root_path} is not a directory")

    split_dirs = _split_folders(root_path)
    if _TRAIN not in split_dirs and split_dirs:
        found = ", ".join(sorted(split_dirs))
        raise DataError(
            f"dataset folder {root_path} has split folder(s) {found} but no '{_TRAIN}' folder; "
            f"use {root_path}/{_TRAIN}/<class>/... (optionally with val/ and test/), "
            f"or put the class folders directly in {root_path}"
        )

    for split_dir in split_dirs.values():
        _check_linked_folder(split_dir, root_path)
    if _TRAIN in split_dirs:
        return _discover_explicit(root_path, split_dirs, fractions=fractions, seed=seed)
    return _discover_flat(root_path, fractions=fractions, seed=seed)


def _split_folders(root: Path) -> dict[str, Path]:
    """``{split name: folder}`` of the split folders in ``root``, in any letter case (``Train/``,
    ``VAL/``: an export from Windows or a labelling tool); two spellings of one split are an error."""
    found: dict[str, Path] = {}
    for folder in _list_dirs(root):
        name = folder.name.lower()
        if name not in SPLIT_NAMES:
            continue
        if name in found:
            raise DataError(f"{root} has both {found[name].name}/ and {folder.name}/: which one is the {name} split? "
                            "Merge them into one folder")
        found[name] = folder
        if folder.name != name:
            logger.info("using %s as the %s split", folder, name)
    return found


def _discover_explicit(
    root: Path, split_dirs: dict[str, Path], *, fractions: tuple[float, float, float], seed: int
) -> DatasetSplits:
    """Layout (a): ``root/train/<class>`` plus optional ``root/val`` and ``root/test``."""
    extra = sorted(
        p.name for p in _list_dirs(root) if p.name.lower() not in SPLIT_NAMES
    )
    if extra:
        logger.warning("ignoring folder(s) %s in %s: only %s are read", ", ".join(extra), root, "/".join(SPLIT_NAMES))

    train_by_class = _scan_class_folders(split_dirs[_TRAIN], root)
    classes = tuple(sorted(train_by_class))
    _check_class_count(classes, split_dirs[_TRAIN])
    index = {name: i for i, name in enumerate(classes)}

    per_split: dict[str, dict[str, list[str]]] = {_TRAIN: train_by_class}
    for name in (_VAL, _TEST):
        if name not in split_dirs:
            continue
        by_class = _scan_class_folders(split_dirs[name], root)
        unknown = sorted(set(by_class) - set(index))
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(repr(c) for c in unknown)} in {split_dirs[name]} "
                f"have no counterpart in {split_dirs[_TRAIN]} (classes there: {', '.join(classes)})"
            )
        missing = sorted(set(index) - set(by_class))
        if missing:
            logger.warning("%s has no folder for class(es) %s", split_dirs[name], ", ".join(missing))
        per_split[name] = by_class

    carved = [name for name in (_VAL, _TEST) if name not in per_split]
    if carved:
        # Only the missing splits are carved; the train/held-out ratio keeps the proportions the
        # user asked for among the splits that do get carved.
        wanted = {_TRAIN: fractions[0], _VAL: fractions[1] if _VAL in carved else 0.0,
                  _TEST: fractions[2] if _TEST in carved else 0.0}
        total = sum(wanted.values())
        carve_fractions = (wanted[_TRAIN] / total, wanted[_VAL] / total, wanted[_TEST] / total)
        logger.info(
            "no %s folder in %s: carving %s out of %s with a stratified split "
            "(fractions train/val/test %.3f/%.3f/%.3f, seed %d)",
            " or ".join(carved), root, " and ".join(carved), split_dirs[_TRAIN],
            *carve_fractions, seed,
        )
        carved_split = _stratified_split(train_by_class, classes, carve_fractions, seed)
        per_split[_TRAIN] = carved_split[_TRAIN]
        for name in carved:
            per_split[name] = carved_split[name]

    return DatasetSplits(
        root=str(root),
        classes=classes,
        train=_to_split_files(per_split[_TRAIN], index),
        val=_to_split_files(per_split[_VAL], index),
        test=_to_split_files(per_split[_TEST], index),
        explicit_splits=not carved,
    )


def _discover_flat(root: Path, *, fractions: tuple[float, float, float], seed: int) -> DatasetSplits:
    """Layout (b): ``root/<class>/*``, split into train / val / test by ``fractions``."""
    by_class = _scan_class_folders(root, root)
    classes = tuple(sorted(by_class))
    _check_class_count(classes, root)
    index = {name: i for i, name in enumerate(classes)}
    logger.info(
        "no %s folder in %s: splitting %d classes into train/val/test with a stratified split "
        "(fractions %.3f/%.3f/%.3f, seed %d)",
        _TRAIN, root, len(classes), *fractions, seed,
    )
    per_split = _stratified_split(by_class, classes, fractions, seed)
    return DatasetSplits(
        root=str(root),
        classes=classes,
        train=_to_split_files(per_split[_TRAIN], index),
        val=_to_split_files(per_split[_VAL], index),
        test=_to_split_files(per_split[_TEST], index),
        explicit_splits=False,
    )


def _stratified_split(
    by_class: dict[str, list[str]],
    classes: tuple[str, ...],
    fractions: tuple[float, float, float],
    seed: int,
) -> dict[str, dict[str, list[str]]]:
    """Shuffle each class with its own seeded generator and cut it by ``fractions``.

    Each class gets ``numpy.random.default_rng([seed, crc32(class name)])``: the split of one
    class then depends only on the seed, its name and its files, not on which other classes exist
    (adding a class does not reshuffle the others), and crc32 (unlike ``hash``) is the same in
    every process and on every platform.
    """
    counts = {name: list(stratified_split_counts(len(by_class[name]), fractions)) for name in classes}

    # With very small classes (< MIN_FILES_FOR_HELD_OUT_GUARANTEE files) the per-class rule can
    # leave a whole held-out split empty although a class could spare a sample: lend one from the
    # class with the most training samples (first in class order on ties) so that no split with a
    # positive fraction ends up empty when that is avoidable.
    for split_index in (1, 2):
        if fractions[split_index] > 0 and all(c[split_index] == 0 for c in counts.values()):
            donor = max(classes, key=lambda name: (counts[name][0], -classes.index(name)))
            if counts[donor][0] >= 2:
                counts[donor][0] -= 1
                counts[donor][split_index] += 1

    result: dict[str, dict[str, list[str]]] = {name: {} for name in SPLIT_NAMES}
    for name in classes:
        files = by_class[name]  # sorted, so the shuffle starts from a platform-independent order
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        order = rng.permutation(len(files))
        n_train, n_val, _ = counts[name]
        cuts = {
            _TRAIN: order[:n_train],
            _VAL: order[n_train : n_train + n_val],
            _TEST: order[n_train + n_val :],
        }
        for split_name, picked in cuts.items():
            # Sorted again so a split lists its files in path order, like an explicit split
            # (``files`` is sorted, so sorting the indices sorts the paths).
            result[split_name][name] = [files[i] for i in np.sort(picked).tolist()]
    return result


def _to_split_files(by_class: dict[str, list[str]], index: dict[str, int]) -> SplitFiles:
    files: list[str] = []
    labels: list[int] = []
    for name in sorted(by_class, key=index.__getitem__):
        files.extend(by_class[name])
        labels.extend([index[name]] * len(by_class[name]))
    return SplitFiles(files=tuple(files), labels=tuple(labels))


def _check_class_count(classes: tuple[str, ...], folder: Path) -> None:
    if len(classes) < MIN_CLASSES:
        raise DataError(
            f"{folder} has {len(classes)} class folder(s) ({', '.join(classes)}); "
            f"at least {MIN_CLASSES} are needed to train a classifier"
        )


def _scan_class_folders(folder: Path, root: Path) -> dict[str, list[str]]:
    """``{class name: sorted absolute image paths}`` for every non-hidden subfolder of ``folder``."""
    class_dirs = _list_dirs(folder)
    for class_dir in class_dirs:
        _check_linked_folder(class_dir, root)
    if not class_dirs:
        loose_images = sum(1 for entry in _list_entries(folder) if entry.is_file() and is_image_file(entry.name))
        hint = (
            f"; its {loose_images} image file(s) must be moved into one subfolder per class"
            if loose_images
            else ""
        )
        raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<image files>){hint}")

    loose = [entry.name for entry in _list_entries(folder) if entry.is_file() and is_image_file(entry.name)]
    if loose:
        logger.warning(
            "ignoring %d image file(s) directly in %s (e.g. %s): images must be inside class folders",
            len(loose), folder, sorted(loose)[0],
        )

    by_class: dict[str, list[str]] = {}
    skipped_in_folder: Counter[str] = Counter()
    for class_dir in class_dirs:
        files, skipped = _scan_images(class_dir, root)
        if not files:
            detail = f" ({sum(skipped.values())} other file(s) skipped)" if skipped else ""
            raise DataError(
                f"class folder {class_dir} contains no image files{detail}; accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)} (any case). Remove the folder or add images"
            )
        by_class[class_dir.name] = files
        skipped_in_folder.update(skipped)
    if skipped_in_folder:
        # A folder of GIFs (or of .jpg files saved as .jfif) would otherwise shrink the dataset unnoticed.
        kinds = ", ".join(f"{count} {ext or '(no extension)'}" for ext, count in skipped_in_folder.most_common())
        logger.warning("%s: skipped %d file(s) that are not images of an accepted type (%s); accepted: %s",
                       folder, sum(skipped_in_folder.values()), kinds, ", ".join(IMAGE_EXTENSIONS))
    return by_class


def _scan_images(class_dir: Path, root: Path) -> tuple[list[str], Counter[str]]:
    """Sorted absolute image paths below ``class_dir`` (recursively, like torchvision's
    ImageFolder) and the non-hidden files skipped for their extension, counted by extension.

    No per-file ``os.path`` call or ``Path`` object (one string concatenation and one C-level suffix
    test per file), since this runs once per file of the dataset at every run start.
    """
    files: list[str] = []
    skipped: Counter[str] = Counter()
    for dirpath, _, filenames in walk_dataset(class_dir, root=root):
        for name in filenames:
            if name.lower().endswith(_IMAGE_SUFFIXES):
                files.append(dirpath + os.sep + name)
            else:
                skipped[os.path.splitext(name)[1].lower()] += 1
    files.sort()
    return files, skipped


def _list_entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}") from exc


def _list_dirs(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _list_entries(folder) if e.is_dir()]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _check_linked_folder(folder: Path, root: Path) -> None:
    """A split or class folder that links into (or above) the dataset would read its files twice."""
    if folder.is_symlink():
        target = os.path.realpath(folder)
        if overlaps_root(target, os.path.realpath(root)):
            raise DataError(f"{folder} is a symlink to {target}, inside (or above) the dataset {root}: its images "
                            "would be read twice, under two labels or splits; replace the link by a real folder")
