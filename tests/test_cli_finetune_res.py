"""`msdali finetune-res` end to end: what it trains, what it writes, and how evaluate reads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from deploy_runs import make_split_folder, train_tiny_run, untrained_run
from multiscale_dali.cli.main import main

SCALE = 64


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _flags() -> list[str]:
    return ["--backend", "torchvision", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("finetune") / "data")


@pytest.fixture(scope="module")
def source(data) -> Path:
    # Shared BatchNorm, so the fine-tuned weights compare key by key with the source's; a model with
    # BatchNorm private to each scale is collapsed to one branch first (test below).
    return train_tiny_run(data, data.parent / "run", scale_norm="shared")


@pytest.fixture(scope="module")
def finetuned(source) -> tuple[Path, Result]:
    result = _cli("finetune-res", "--checkpoint", str(source), "--scale", str(SCALE), "--epochs", "2", *_flags())
    assert result.exit_code == 0, result.output
    return source.parent.parent / f"run-fixres{SCALE}", result


def test_a_new_run_directory_holds_the_fine_tuned_model_and_before_after_figures(source, finetuned):
    out, result = finetuned
    assert {"best.pt", "config.json", "metrics.jsonl", "results.json"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]) == set(results["before"]) == {str(SCALE)}
    assert results["finetune"]["source"] == str(source) and not results["finetune"]["classifier_only"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    before, after = results["before"][str(SCALE)], results["test"][str(SCALE)]
    assert f"test {SCALE}px before: accuracy {before['accuracy']:.1%}" in result.output
    assert f"test {SCALE}px after:  accuracy {after['accuracy']:.1%}" in result.output
    assert not (source.parent / "eval.json").exists()  # the source run is left as it was


def test_only_batchnorm_and_the_classifier_change(source, finetuned):
    out, _ = finetuned
    old = torch.load(source, weights_only=True)["model"]
    new = torch.load(out / "best.pt", weights_only=True)["model"]
    changed = {key for key in old if not torch.equal(old[key], new[key])}
    convs = {key for key in old if key.startswith("features.") and key.endswith(".weight") and old[key].ndim == 4}
    assert convs and not convs & changed  # every convolution frozen
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert {"features.1.weight", "features.1.running_mean", "features.1.running_var"} <= changed  # BN: affine + stats


def test_evaluate_measures_the_fine_tuned_run_at_its_scale_as_its_results_say(finetuned):
    out, _ = finetuned
    result = _cli("-q", "evaluate", "--checkpoint", str(out / "best.pt"), *_flags())
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["scales"] == [SCALE]
    test = json.loads((out / "results.json").read_text())["test"][str(SCALE)]
    assert report["rows"][0]["accuracy"] == pytest.approx(test["accuracy"])
    assert report["rows"][0]["loss"] == pytest.approx(test["loss"], rel=1e-4)


def test_an_output_directory_holding_a_run_is_refused(source, finetuned):
    out, _ = finetuned
    result = _cli("finetune-res", "--checkpoint", str(source), "--scale", str(SCALE), "--out", str(out), *_flags())
    assert result.exit_code == 2 and result.output.startswith("Error: --out: ")


@pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is None, reason="needs the timm extra")
def test_a_model_without_batchnorm_fine_tunes_its_classifier_only_and_says_so(data, tmp_path):
    checkpoint = untrained_run(data, tmp_path / "vit", model="timm:test_vit", scales=(32,))
    result = _cli("finetune-res", "--checkpoint", str(checkpoint), "--scale", "48", *_flags())
    assert result.exit_code == 0, result.output
    assert "the model has no BatchNorm layers: fine-tuned the classifier (head) only" in result.output
    old = torch.load(checkpoint, weights_only=True)["model"]
    new = torch.load(tmp_path / "vit-fixres48" / "best.pt", weights_only=True)["model"]
    assert {key for key in old if not torch.equal(old[key], new[key])} == {"head.weight", "head.bias"}


def test_a_model_with_private_norms_is_fine_tuned_as_a_plain_network_of_its_nearest_branch(data, tmp_path):
    run = train_tiny_run(data, tmp_path / "private")
    assert any(".norms.48." in key for key in torch.load(run, weights_only=True)["model"])
    out = tmp_path / "fixres"
    result = _cli("finetune-res", "--checkpoint", str(run), "--scale", str(SCALE), "--epochs", "1", "--out", str(out),
                  *_flags())
    assert result.exit_code == 0, result.output
    keys = set(torch.load(out / "best.pt", weights_only=True)["model"])
    assert "features.1.weight" in keys and not any(".norms." in key for key in keys)
    evaluated = _cli("evaluate", "--checkpoint", str(out / "best.pt"), *_flags())
    assert evaluated.exit_code == 0, evaluated.output
