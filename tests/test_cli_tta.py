"""Flip test-time augmentation in `msdali evaluate` and `msdali predict`: separate rows, the right means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from deploy_runs import make_split_folder, untrained_run
from multiscale_dali.cli.main import main
from multiscale_dali.evaluation.model import load_model
from multiscale_dali.evaluation.predict import preprocess_image
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader
from multiscale_dali.training.losses import probabilities

SCALES = (32, 48)


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tta")
    return untrained_run(make_split_folder(root / "data"), root / "run", model="tiny_cnn", scales=SCALES)


@pytest.fixture(scope="module")
def report(checkpoint) -> dict:
    result = _cli("-q", "evaluate", "--checkpoint", str(checkpoint), "--tta", "flip", "--backend", "torchvision",
                  "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "ensemble+flip" in result.output and "best resolution (as trained+flip)" in result.output
    return json.loads((checkpoint.parent / "eval.json").read_text())


def _test_probabilities(checkpoint: Path, scale: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p(image), p(mirror), labels) over the test split at ``scale``, computed here from the eval loader."""
    loaded = load_model(checkpoint)
    files = sorted((Path(loaded.resolved["data"]) / "test").rglob("*.jpg"))
    labels = tuple(int(p.parent.name.split("_")[1]) for p in files)
    spec = LoaderSpec(files=tuple(map(str, files)), labels=labels, schedule=constant_schedule([scale]), batch_size=4,
                      train=False, num_workers=0)
    plain, mirror, targets = [], [], []
    with torch.no_grad():
        for batch in TorchvisionLoader(spec).epoch(0):
            images = batch.images[scale]
            plain.append(probabilities(loaded.model(images), task=loaded.task))
            mirror.append(probabilities(loaded.model(torch.flip(images, dims=(-1,))), task=loaded.task))
            targets.append(batch.labels)
    return torch.cat(plain), torch.cat(mirror), torch.cat(targets)


def _accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) == labels).double().mean())


def test_flip_rows_are_separate_and_the_plain_rows_do_not_change(report, checkpoint):
    names = [row["name"] for row in report["rows"]]
    assert names == ["32px", "48px", "ensemble", "32px+flip", "48px+flip", "ensemble+flip"]
    assert {row["tta"] for row in report["rows"][3:]} == {"flip"} and report["tta"] == "flip"
    plain = _cli("-q", "evaluate", "--checkpoint", str(checkpoint), "--backend", "torchvision", "--workers", "0",
                 "--device", "cpu", "--json", str(checkpoint.parent / "plain.json"))
    assert plain.exit_code == 0, plain.output
    rows = json.loads((checkpoint.parent / "plain.json").read_text())["rows"]
    assert [(r["name"], r["accuracy"], r["loss"]) for r in rows] == [
        (r["name"], r["accuracy"], r["loss"]) for r in report["rows"][:3]]


def test_a_flip_row_is_the_mean_of_the_image_and_its_mirror(report, checkpoint):
    plain, mirror, labels = _test_probabilities(checkpoint, 48)
    mean = (plain + mirror) / 2
    row = next(r for r in report["rows"] if r["name"] == "48px+flip")
    assert row["accuracy"] == pytest.approx(_accuracy(mean, labels))
    assert row["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(mean.log(), labels)), rel=1e-4)


def test_the_flip_ensemble_is_the_mean_over_every_scale_and_mirror(report, checkpoint):
    views = [p for scale in SCALES for p in _test_probabilities(checkpoint, scale)[:2]]
    labels = _test_probabilities(checkpoint, SCALES[0])[2]
    mean = torch.stack(views).mean(dim=0)
    row = next(r for r in report["rows"] if r["name"] == "ensemble+flip")
    assert row["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(mean.log(), labels)), rel=1e-4)


def test_predict_with_flip_averages_the_image_and_its_mirror(checkpoint):
    image = str(sorted((checkpoint.parent.parent / "data" / "test").rglob("*.jpg"))[0])
    loaded = load_model(checkpoint)
    pixels = preprocess_image(image, scales=(48,))[48]
    with torch.no_grad():
        views = [loaded.model(x) for x in (pixels, torch.flip(pixels, dims=(-1,)))]
    mean = torch.stack([probabilities(v, task=loaded.task) for v in views]).mean(dim=0)[0]
    result = _cli("predict", "--checkpoint", str(checkpoint), image, "--scale", "48", "--tta", "flip", "--device", "cpu")
    assert result.exit_code == 0, result.output
    path, label, probability = result.output.strip().split("\t")
    assert label == loaded.classes[int(mean.argmax())]
    assert float(probability) == pytest.approx(float(mean.max()), abs=1e-4)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_an_unknown_tta_is_a_one_line_error_naming_the_choices(checkpoint, command):
    extra = ["unused.jpg"] if command == "predict" else []
    result = _cli(command, "--checkpoint", str(checkpoint), *extra, "--tta", "foo")
    assert result.exit_code == 2
    assert result.output == "Error: --tta: 'foo' is not one of none, flip\n"
