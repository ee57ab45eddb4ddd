"""`evaluate` on a dataset that grew since training measures the run's own test files, or refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_jpeg_folder, synthetic_image
from multiscale_dali.constants import SPLITS_FILE
from multiscale_dali.data.discovery import DataError, discover_dataset
from multiscale_dali.evaluation.evaluate import EvalOptions, evaluate_checkpoint, load_splits
from multiscale_dali.evaluation.model import load_model
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.run import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("grown")
    root = base / "images"
    make_jpeg_folder(root, classes=2, per_class=10, sizes=[(40, 40)])
    out = base / "run"
    run_training(TrainConfig(data=str(root), out=str(out), backend="torchvision", scales=(32,), batch_size=8,
                             workers=0, epochs=1))
    return root, out


def _grow(root: Path, count: int) -> None:
    for label in (0, 1):
        for i in range(count):
            Image.fromarray(synthetic_image(40, 40, seed=100 + i)).save(root / f"class_{label}" / f"new_{i:03d}.jpg")


def _test_files(root: Path, out: Path) -> tuple[str, ...]:
    return load_splits(load_model(out / "best.pt"), root).test.files


def test_the_run_records_its_held_out_files(trained):
    root, out = trained
    record = json.loads((out / SPLITS_FILE).read_text())
    splits = discover_dataset(root)
    assert [str(root / f) for f in record["test"]["files"]] == list(splits.test.files)
    assert [str(root / f) for f in record["val"]["files"]] == list(splits.val.files)


def test_a_grown_dataset_is_evaluated_on_the_recorded_test_files(tmp_path, trained):
    root, out = trained
    grown, run = tmp_path / "images", tmp_path / "run"
    shutil.copytree(root, grown)
    shutil.copytree(out, run)
    # The copy is evaluated as the run's own dataset: point the record at it, as a moved dataset would be.
    recorded = _test_files(root, out)
    _grow(grown, 30)
    assert discover_dataset(grown).test.files != tuple(f.replace(str(root), str(grown)) for f in recorded)
    loaded = load_model(run / "best.pt")
    loaded.resolved["data"] = str(grown)
    splits = load_splits(loaded, grown)
    assert splits.test.files == tuple(f.replace(str(root), str(grown)) for f in recorded)
    assert not set(splits.train.files) & (set(splits.test.files) | set(splits.val.files))


def test_without_the_record_a_grown_dataset_is_refused(tmp_path, trained):
    root, out = trained
    grown, run = tmp_path / "images", tmp_path / "run"
    shutil.copytree(root, grown)
    shutil.copytree(out, run)
    (run / SPLITS_FILE).unlink()
    _grow(grown, 5)
    loaded = load_model(run / "best.pt")
    loaded.resolved["data"] = str(grown)
    with pytest.raises(DataError, match="changed since the checkpoint was trained"):
        load_splits(loaded, grown)


def test_an_unchanged_dataset_evaluates_as_before(trained):
    root, out = trained
    report = evaluate_checkpoint(out / "best.pt", options=EvalOptions(backend="torchvision", device="cpu", workers=0))
    assert report.num_samples == len(discover_dataset(root).test)
