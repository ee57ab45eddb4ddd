"""`msdali plot`: PNG figures from a run directory (a tiny 2-epoch run on the embedded textures)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from multiscale_dali.training.run import run_training
from multiscale_dali.cli.main import main
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.reporting.plot import PlotError, plot_run, read_run, schedule_by_epoch

SCALES = (32, 48)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plot") / "run"
    run_training(TrainConfig(
        out=str(out), epochs=2, scales=SCALES, batch_size=32, model="tiny_cnn", backend="torchvision",
        workers=0, device="cpu",
    ))
    return out


@pytest.fixture(scope="module")
def evaluated_run(run_dir) -> Path:
    from multiscale_dali.evaluation.evaluate import EvalOptions, default_eval_path, evaluate_checkpoint

    report = evaluate_checkpoint(run_dir / "best.pt", options=EvalOptions(
        scales=(24, 32, 48, 64), backend="torchvision", device="cpu", workers=0, batch_size=32,
        recalibrate_bn=True, bn_batches=2,
    ))
    default_eval_path(run_dir / "best.pt").write_text(json.dumps(report.to_json()))
    return run_dir


def _assert_pngs(paths: list[Path]) -> None:
    from PIL import Image

    for path in paths:
        assert path.stat().st_size > 1000, path
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_plot_writes_training_and_evaluation_figures(evaluated_run):
    pytest.importorskip("matplotlib")
    written = plot_run(evaluated_run)
    assert {p.name for p in written} == {"training.png", "schedule.png", "resolution.png", "summary.png"}
    assert all(p.parent == evaluated_run / "plots" for p in written)
    _assert_pngs(written)


def test_plot_command(evaluated_run, tmp_path):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(main, ["plot", str(evaluated_run), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote ") == 4
    _assert_pngs(sorted(tmp_path.glob("*.png")))


def _fake_progressive_run(root: Path) -> Path:
    """metrics.jsonl and config.json of a progressive run: one growing scale, val at current + final."""
    root.mkdir()
    stages = [[0, [32]], [2, [48]], [3, [64]]]
    lines = []
    for epoch, scale in enumerate([32, 32, 48, 64]):
        val = {str(s): {"loss": 1.0 / (epoch + 1), "accuracy": 0.5 + 0.1 * epoch} for s in {scale, 64}}
        lines.append(json.dumps({"epoch": epoch, "scales": [scale], "train": {str(scale): {"loss": 1.2 - 0.2 * epoch,
                                 "accuracy": 0.4 + 0.1 * epoch}}, "val": val}))
    (root / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (root / "config.json").write_text(json.dumps({"config": {"epochs": 4, "mode": "progressive"},
                                                  "schedule": {"stages": stages}}))
    return root


def test_progressive_schedule_is_read_per_epoch(tmp_path):
    run = read_run(_fake_progressive_run(tmp_path / "prog"))
    assert schedule_by_epoch(run.config, 4) == [(32,), (32,), (48,), (64,)]
    assert run.scales == [32, 48, 64]
    pytest.importorskip("matplotlib")
    written = plot_run(run.run_dir)
    assert "resolution.png" not in {p.name for p in written}  # no eval.json: no sweep figure
    _assert_pngs(written)


def test_a_directory_without_metrics_is_named(tmp_path):
    with pytest.raises(PlotError, match="metrics.jsonl"):
        plot_run(tmp_path)
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'metrics.jsonl'} not found" in result.output


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'multiscale-dali\[plot\]'"):
        plot_run(_fake_progressive_run(tmp_path / "prog"))
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "prog")])
    assert result.exit_code == 1 and "multiscale-dali[plot]" in result.output
