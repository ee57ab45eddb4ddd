"""The user's side of the CLI: evaluate, predict, recipes, TensorBoard, progress bars, run metadata.

One tiny `msdali train` (1 epoch, tiny_cnn, 32/48 px, embedded textures) runs once for the module, as
a real subprocess: its stderr is a pipe, as in CI, and its config.json records a real command line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from multiscale_dali.cli.main import main
from multiscale_dali.models import input_size
from multiscale_dali.training.config import load_recipe
from multiscale_dali.reporting.progress import EpochProgress
from multiscale_dali.training.trainer import StepEvent

REPO = Path(__file__).resolve().parent.parent
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str], subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["train", "--epochs", "1", "--scales", "32,48", "--batch-size", "32", "--model", "tiny_cnn",
            "--backend", "torchvision", "--workers", "0", "--device", "cpu", "--out", str(out)]
    args += ["--tensorboard"] if HAS_TENSORBOARD else []
    args += ["--plot"] if HAS_MATPLOTLIB else []
    done = subprocess.run([sys.executable, "-m", "multiscale_dali.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return out, args, done


def _images(run_dir: Path, count: int) -> list[str]:
    config = json.loads((run_dir / "config.json").read_text())
    return sorted(str(p) for p in Path(config["resolved"]["data"]).glob("test/*/*.jpg"))[:count]


# ---------------------------------------------------------------------------------------- run metadata
def test_the_run_records_its_command_line_and_versions(trained):
    out, args, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["argv"][1:] == args
    versions = config["versions"]
    assert versions["torch"] == torch.__version__
    assert {"msdali", "python", "torchvision", "dali", "pillow"} <= set(versions)


def test_no_progress_bar_when_stderr_is_not_a_terminal(trained):
    _, _, done = trained
    assert "img/s]" not in done.stderr and "\r" not in done.stderr
    assert "epoch   1/1 |" in done.stdout


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard not installed")
def test_tensorboard_event_files_hold_the_epoch_metrics(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = trained
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train_32px", "accuracy/val_48px", "lr", "images_per_second"} <= tags
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    logged = events.Scalars("accuracy/val_48px")[0]
    assert logged.step == 1 and logged.value == pytest.approx(metrics["val"]["48"]["accuracy"])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_train_plot_writes_figures_at_the_end(trained):
    out, _, done = trained
    assert (out / "plots" / "training.png").stat().st_size > 1000
    assert f"wrote {out / 'plots' / 'summary.png'}" in done.stdout


def test_missing_tensorboard_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(main, ["train", "--tensorboard", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--tensorboard" in result.output and "pip install 'multiscale-dali[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- progress
class _CountingLoss:
    """Stands in for a device tensor: counts how often the bar reads it (each read is a sync)."""

    def __init__(self) -> None:
        self.reads = 0

    def __float__(self) -> float:
        self.reads += 1
        return 0.25


def test_progress_bar_steps_aside_without_a_terminal():
    progress = EpochProgress(epochs=1, stream=io.StringIO())
    progress.on_step(StepEvent(epoch=0, step=1, global_step=1, batch_size=8))
    assert progress.bar.disable
    progress.close()


def test_progress_bar_reads_the_loss_every_few_steps():
    stream, loss = io.StringIO(), _CountingLoss()
    progress = EpochProgress(epochs=2, stream=stream, loss_every=5, enabled=True)
    for step in range(1, 21):
        progress.on_step(StepEvent(epoch=0, step=step, global_step=step, batch_size=8, loss=loss))
    assert loss.reads == 5  # steps 1, 5, 10, 15, 20
    progress.close()
    assert "epoch 1/2" in stream.getvalue() and "img/s" in stream.getvalue()
    progress.on_step(StepEvent(epoch=1, step=1, global_step=21, batch_size=8))
    assert progress.bar.total == 160  # learned from the first full epoch
    progress.close()


# ---------------------------------------------------------------------------------------- evaluate
def test_evaluate_prints_a_table_and_writes_eval_json(trained):
    out, _, _ = trained
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(out / "best.pt"), "--scales", "24,32,48",
                                       "--backend", "torchvision", "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "ensemble" in result.output and "best resolution (as trained): " in result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["scales"] == [24, 32, 48] and report["task"] == "multiclass"
    assert [row["name"] for row in report["rows"]] == ["24px", "32px", "48px", "ensemble"]
    assert all(row["auc"] is None for row in report["rows"])  # AUC only for binary tasks
    assert report["best"]["as_trained"]["scale"] in (24, 32, 48)


def test_evaluate_recalibrated_to_a_chosen_json(trained, tmp_path):
    out, _, _ = trained
    target = tmp_path / "sweep.json"
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(out / "best.pt"), "--split", "val",
                                       "--recalibrate-bn", "--bn-batches", "1", "--backend", "torchvision",
                                       "--workers", "0", "--device", "cpu", "--json", str(target)])
    assert result.exit_code == 0, result.output
    report = json.loads(target.read_text())
    assert report["split"] == "val" and report["recalibrate_bn"]
    assert {row["variant"] for row in report["rows"]} == {"as_trained", "bn_recalibrated"}


@pytest.mark.parametrize("extra, flag", [(["--checkpoint", "missing.pt"], "--checkpoint"),
                                         (["--scales", "48,x"], "--scales"), (["--batch-size", "0"], "--batch-size")])
def test_evaluate_errors_name_the_flag(trained, extra, flag):
    out, _, _ = trained
    args = ["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"Error: {flag}: " in result.output


@pytest.fixture
def tiny_cnn_needs_40px(monkeypatch):
    """As if the run's model could not run below 40 px (the registry's real one runs at any size)."""
    real = input_size.smallest_scale
    monkeypatch.setattr(input_size, "smallest_scale",
                        lambda name, *, num_outputs: 40 if name == "tiny_cnn" else real(name, num_outputs=num_outputs))


def test_evaluate_refuses_a_scale_the_model_cannot_run_at_before_reading_data(trained, tmp_path, tiny_cnn_needs_40px):
    out, _, _ = trained
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                                       "--scales", "32,48", "--data", str(tmp_path / "absent")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: --model: tiny_cnn cannot run at 32 px") and "40 px" in result.output


@pytest.mark.parametrize("scale_args", [["--scale", "32"], ["--scales", "32,48"]])
def test_predict_refuses_a_scale_the_model_cannot_run_at(trained, tiny_cnn_needs_40px, scale_args):
    out, _, _ = trained
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                                       *scale_args, *_images(out, 1)])
    assert result.exit_code == 2, result.output
    assert "tiny_cnn cannot run at" in result.output and "40 px" in result.output


# ---------------------------------------------------------------------------------------- predict
def test_predict_prints_one_line_per_image(trained):
    out, _, _ = trained
    images = _images(out, 3)
    classes = json.loads((out / "config.json").read_text())["classes"]
    for scale_args in ([], ["--scale", "32"], ["--scales", "32,48"]):
        result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                                           *scale_args, *images])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert len(lines) == len(images)
        for line, image in zip(lines, images):
            path, label, probability = line.split("\t")
            assert path == image and label in classes and 1 / len(classes) <= float(probability) <= 1


def test_predict_names_a_missing_image_in_one_line(trained, tmp_path):
    out, _, _ = trained
    missing = tmp_path / "no-such-photo.jpg"
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu",
                                       *_images(out, 1), str(missing)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: image file not found: {missing}"]


def test_predict_names_an_unreadable_image(trained, tmp_path):
    out, _, _ = trained
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), "--device", "cpu", str(bad)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert f"cannot read image {bad}" in result.output


def test_predict_refuses_scale_and_scales_together(trained):
    out, _, _ = trained
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(out / "best.pt"), "--scale", "32",
                                       "--scales", "32,48", *_images(out, 1)])
    assert result.exit_code == 2 and "--scale and --scales" in result.output


# ---------------------------------------------------------------------------------------- recipes
def test_recipes_lists_every_recipe_with_its_description():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0, result.output
    recipes = sorted((REPO / "pipelines").glob("*.toml"))
    assert recipes
    lines = result.output.splitlines()
    for path in recipes:
        _, description = load_recipe(path)
        assert description, f"{path.name} has no description"
        listed = [line for line in lines if line.startswith(f"{path.stem} ")]
        assert len(listed) == 1 and listed[0].rstrip().endswith(description), result.output
