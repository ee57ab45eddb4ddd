"""The held-out splits a run trained against, recorded in ``RUN_DIR/splits.json``.

``msdali evaluate`` rebuilds a run's splits from its dataset with the run's fractions and seed. If
the dataset grew since (new images in a flat ``root/<class>/`` folder), that re-split differs: images
the model trained on can land in the test split, and the accuracy looks better than it is. So the
run records its val and test files (paths relative to the dataset root, so a dataset mounted
elsewhere still matches) and a fingerprint of every split (in ``resolved``, which every checkpoint
carries); evaluate measures the recorded files, or refuses when only the fingerprint is known and
no longer matches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from multiscale_dali.constants import SPLITS_FILE
from multiscale_dali.data.discovery import DataError, DatasetSplits, SplitFiles

RECORD_VERSION = 1
HELD_OUT = ("val", "test")


def split_record(splits: DatasetSplits, *, fingerprint: str) -> dict[str, Any]:
    """What ``splits.json`` holds: the val and test files relative to the root, with their labels."""
    return {
        "version": RECORD_VERSION, "fingerprint": fingerprint, "classes": list(splits.classes),
        **{name: {"files": [os.path.relpath(f, splits.root) for f in splits.split(name).files],
                  "labels": [int(label) for label in splits.split(name).labels]} for name in HELD_OUT},
    }


def read_split_record(run_dir: Path) -> dict[str, Any] | None:
    """``RUN_DIR/splits.json``, or None when the run has none (it predates the record)."""
    path = Path(run_dir) / SPLITS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} cannot be read: {err}") from None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise DataError(f"{path} is not a split record of this msdali version")
    return record


def recorded_splits(current: DatasetSplits, record: Mapping[str, Any], *, source: Path) -> DatasetSplits:
    """``current`` with its val and test replaced by the recorded files (under ``current.root``).

    The train split keeps the current files minus the recorded held-out ones: it only feeds BatchNorm
    recalibration, which must not see a test image either.
    """
    if list(record.get("classes", [])) != list(current.classes):
        raise DataError(f"{source} records classes {record.get('classes')}, {current.root} has {list(current.classes)}")
    held_out = {}
    for name in HELD_OUT:
        part = record[name]
        files = tuple(os.path.join(current.root, rel) for rel in part["files"])
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise DataError(f"{len(missing)} file(s) of the run's {name} split (recorded in {source}) are gone from "
                            f"{current.root}, e.g. {missing[0]}; the split it was measured on cannot be rebuilt")
        held_out[name] = SplitFiles(files=files, labels=tuple(int(label) for label in part["labels"]))
    taken = {f for split in held_out.values() for f in split.files}
    kept = [(f, label) for f, label in zip(current.train.files, current.train.labels) if f not in taken]
    train = SplitFiles(files=tuple(f for f, _ in kept), labels=tuple(label for _, label in kept))
    return DatasetSplits(root=current.root, classes=current.classes, train=train, val=held_out["val"],
                         test=held_out["test"], explicit_splits=current.explicit_splits)
