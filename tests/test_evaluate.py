"""Evaluation of a trained checkpoint: AUC, BatchNorm recalibration, the eval geometry, the sweep.

One tiny binary run on the embedded textures (1 epoch, tiny_cnn, 32/48 px) serves the whole module.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_jpeg_folder
from torch import nn

from multiscale_dali.training.run import run_training
from multiscale_dali.training.config import ConfigError, TrainConfig
from multiscale_dali.data.discovery import DataError
from multiscale_dali.evaluation.batchnorm import BatchNormRecalibration, recalibrate_batchnorm
from multiscale_dali.evaluation.evaluate import EvalOptions, evaluate_checkpoint
from multiscale_dali.evaluation.model import load_model
from multiscale_dali.evaluation.predict import preprocess_image
from multiscale_dali.evaluation.report import (
    AS_TRAINED,
    BN_RECALIBRATED,
    ENSEMBLE,
    default_eval_path,
    format_report,
    roc_auc,
)
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.models.registry import build_model
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader

SCALES = (32, 48)


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    run_training(TrainConfig(
        out=str(out), default_dataset="textures-binary", epochs=1, scales=SCALES, batch_size=32,
        model="tiny_cnn", backend="torchvision", workers=0, device="cpu",
    ))
    return out


def _options(**changes) -> EvalOptions:
    base = dict(backend="torchvision", device="cpu", workers=0, batch_size=32)
    return EvalOptions(**(base | changes))


# ---------------------------------------------------------------------------------------- AUC
def _pairwise_auc(scores, labels) -> float:
    """The definition: P(score of a positive > score of a negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_extremes_and_ties():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # few values: many ties
    labels = rng.integers(0, 2, size=40)
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_is_undefined_with_one_class():
    assert roc_auc([0.1, 0.7], [1, 1]) is None


# ---------------------------------------------------------------------------------------- BatchNorm
def test_recalibration_is_a_cumulative_average_on_a_copy():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_outputs=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 3, 32, 32) * 2 + 1 for _ in range(3)]
    fixed = recalibrate_batchnorm(model, batches, max_batches=10)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the original changed"
    conv, norm = fixed.features[0], fixed.features[1]
    with torch.no_grad():
        batch_means = [conv(x).mean(dim=(0, 2, 3)) for x in batches]
    # momentum=None: every batch weighs the same, whatever the original momentum was.
    torch.testing.assert_close(norm.running_mean, torch.stack(batch_means).mean(0))
    assert int(norm.num_batches_tracked) == 3
    assert norm.momentum == model.features[1].momentum  # restored after the estimate
    assert not fixed.training


def test_recalibration_changes_statistics_but_not_weights():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_outputs=1).eval()
    fixed = recalibrate_batchnorm(model, [torch.randn(4, 3, 32, 32) + 3 for _ in range(2)], max_batches=1)
    for (name, old), new in zip(model.named_parameters(), fixed.parameters()):
        assert torch.equal(old, new), name
    buffers = dict(fixed.named_buffers())
    assert not torch.allclose(buffers["features.1.running_mean"], model.features[1].running_mean)
    assert int(buffers["features.1.num_batches_tracked"]) == 1  # max_batches honoured


def test_recalibration_keeps_dropout_in_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.9), nn.BatchNorm2d(4)).eval()
    recalibration = BatchNormRecalibration(model)
    assert not recalibration.model[1].training, "dropout in train mode would skew the statistics"
    assert recalibration.model[2].training


# ---------------------------------------------------------------------------------------- geometry
def test_preprocess_matches_the_eval_pipeline(jpeg_folder):
    files, labels = jpeg_folder
    for scale in SCALES:
        spec = LoaderSpec(files=tuple(files), labels=tuple(labels), schedule=constant_schedule((scale,)),
                          batch_size=len(files), train=False, num_workers=0)
        batch = next(iter(TorchvisionLoader(spec).epoch(0)))
        ours = torch.cat([preprocess_image(f, scales=(scale,))[scale] for f in files])
        assert torch.equal(ours, batch.images[scale])


# ---------------------------------------------------------------------------------------- the sweep
@pytest.fixture(scope="module")
def report(binary_run):
    return evaluate_checkpoint(binary_run / "best.pt", options=_options(recalibrate_bn=True, bn_batches=2))


def test_report_has_every_scale_the_ensemble_and_a_best_scale(report):
    data = json.loads(json.dumps(report.to_json()))  # JSON-able as written
    assert {"checkpoint", "split", "num_samples", "task", "classes", "scales", "rows", "best"} <= set(data)
    assert data["task"] == "binary" and data["split"] == "test" and data["num_samples"] > 0
    for variant in (AS_TRAINED, BN_RECALIBRATED):
        rows = [row for row in data["rows"] if row["variant"] == variant]
        assert [row["name"] for row in rows] == ["32px", "48px", ENSEMBLE]
        for row in rows:
            assert 0.0 <= row["accuracy"] <= 1.0
            assert row["loss"] > 0
            assert 0.0 <= row["auc"] <= 1.0
        assert data["best"][variant]["scale"] in SCALES
    assert any("best resolution" in line for line in format_report(report))


def test_largest_trained_scale_reproduces_the_runs_test_result(binary_run):
    # At the largest scale the training pipeline resizes straight from the crop, as evaluation does.
    report = evaluate_checkpoint(binary_run / "best.pt", options=_options(scales=(48,)))
    expected = json.loads((binary_run / "results.json").read_text())["test"]["48"]
    assert report.rows[0].accuracy == pytest.approx(expected["accuracy"])
    assert report.rows[0].loss == pytest.approx(expected["loss"], rel=1e-5)


def test_a_scale_does_not_depend_on_the_rest_of_the_sweep(binary_run, report):
    alone = evaluate_checkpoint(binary_run / "best.pt", options=_options(scales=(32,)))
    in_sweep = next(row for row in report.rows if row.variant == AS_TRAINED and row.scale == 32)
    assert alone.rows[0].accuracy == in_sweep.accuracy
    assert alone.rows[0].loss == pytest.approx(in_sweep.loss)


def test_a_training_checkpoint_loads_like_best(binary_run, report):
    # One epoch: the last checkpoint holds the best weights.
    last = binary_run / "checkpoints" / "last.pt"
    from_last = evaluate_checkpoint(last, options=_options())
    as_trained = [row for row in report.rows if row.variant == AS_TRAINED]
    assert [(r.name, r.accuracy) for r in from_last.rows] == [(r.name, r.accuracy) for r in as_trained]
    assert default_eval_path(last) == binary_run / "eval.json"
    assert load_model(last).epoch == 0


def test_errors_name_the_flag(binary_run, tmp_path):
    with pytest.raises(ConfigError) as missing:
        load_model(tmp_path / "nope.pt")
    assert missing.value.flag == "--checkpoint"
    with pytest.raises(ConfigError) as split:
        EvalOptions(split="train")
    assert split.value.flag == "--split"
    with pytest.raises(ConfigError) as scales:
        evaluate_checkpoint(binary_run / "best.pt", options=_options(scales=(48, 32)))
    assert scales.value.flag == "--scales"
    make_jpeg_folder(tmp_path / "other", classes=2, per_class=4)  # class_0, class_1: not the run's
    with pytest.raises(DataError, match="the checkpoint was trained on brick, gravel"):
        evaluate_checkpoint(binary_run / "best.pt", options=_options(data=str(tmp_path / "other")))


def test_dali_backend_measures_what_torchvision_measures(binary_run):
    from multiscale_dali.pipelines.factory import dali_installed

    if not dali_installed():
        pytest.skip("DALI not installed")
    # Batch size 24 does not divide the 64 test images: the partial last batch must count, unpadded.
    dali = evaluate_checkpoint(binary_run / "best.pt", options=_options(scales=(48,), backend="dali", batch_size=24))
    torchvision = evaluate_checkpoint(binary_run / "best.pt", options=_options(scales=(48,), batch_size=24))
    assert dali.num_samples == torchvision.num_samples == 64
    # The backends' resize kernels differ by rounding only: at most one image may flip.
    assert abs(dali.rows[0].accuracy - torchvision.rows[0].accuracy) <= 1 / dali.num_samples + 1e-9
    assert dali.rows[0].loss == pytest.approx(torchvision.rows[0].loss, rel=0.05)


def test_the_command_line_names_still_import_from_evaluate() -> None:
    from multiscale_dali.evaluation import evaluate, model, predict, report

    for name in ("default_eval_path", "format_report"):
        assert getattr(evaluate, name) is getattr(report, name)
    assert evaluate.load_model is model.load_model
    for name in ("ImageError", "default_predict_scales", "predict_images"):
        assert getattr(evaluate, name) is getattr(predict, name)
