"""A stop signal at any moment of `msdali train` exits 75: during start-up (nothing to save), during
training (a checkpoint) and during the final test pass (results.json says the test is still to do)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_jpeg_folder
from multiscale_dali.cli.main import main
from multiscale_dali.constants import EXIT_INTERRUPTED
from multiscale_dali.training import run as run_module
from multiscale_dali.training import run_data
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.run import run_training
from multiscale_dali.training.signals import StartupInterrupted, StopRequest

SMALL = ["--scales", "32", "--batch-size", "4", "--workers", "0", "--epochs", "1", "--backend", "torchvision",
         "--no-scan"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signals") / "images"
    make_jpeg_folder(root, classes=2, per_class=6, sizes=[(40, 40)])
    return root


def _kill_self(sig: signal.Signals = signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)


def test_an_immediate_stop_request_raises_at_once_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StartupInterrupted, match="SIGTERM"):
        with StopRequest(immediate=True):
            _kill_self()
            pytest.fail("the handler should have raised")
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_data_is_read_exits_75_and_writes_nothing(tmp_path, image_root, monkeypatch, sig):
    real = run_data.discover_dataset

    def discover_then_signal(*args, **kwargs):
        _kill_self(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_data, "discover_dataset", discover_then_signal)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(image_root), "--out", str(out), *SMALL])
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    assert f"stopped by {sig.name}" in result.output and "Traceback" not in result.output
    assert not (out / "results.json").exists() and not (out / "metrics.jsonl").exists()


def test_a_signal_while_the_flags_are_checked_exits_75(tmp_path, image_root, monkeypatch):
    from multiscale_dali.cli import train as train_command

    monkeypatch.setattr(train_command, "check_run_scales", lambda config: _kill_self(signal.SIGINT))
    result = CliRunner().invoke(main, ["train", "--data", str(image_root), "--out", str(tmp_path / "run"), *SMALL])
    assert result.exit_code == EXIT_INTERRUPTED, result.output


def test_a_signal_during_the_test_pass_exits_75_and_resume_runs_only_the_test(tmp_path, image_root, monkeypatch):
    real = run_module._until_stopped

    def signal_first(batches, should_stop):
        _kill_self()
        return real(batches, should_stop)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_until_stopped", signal_first)
        stopped = CliRunner().invoke(main, ["train", "--data", str(image_root), "--out", str(out), *SMALL])
    assert stopped.exit_code == EXIT_INTERRUPTED, stopped.output
    assert "final test pass" in stopped.output and "--resume auto" in stopped.output
    pending = json.loads((out / "results.json").read_text())
    assert pending["test_complete"] is False and pending["test"] == {}
    assert (out / "best.pt").exists()

    resumed = CliRunner().invoke(main, ["train", "--out", str(out), "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    done = json.loads((out / "results.json").read_text())
    assert done["test_complete"] is True and set(done["test"]) == {"32"}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # no epoch trained twice


def test_a_signal_at_the_last_epoch_end_stops_the_test_pass_of_the_library_run(tmp_path, image_root):
    config = TrainConfig(data=str(image_root), out=str(tmp_path / "run"), backend="torchvision", scales=(32,),
                         batch_size=4, workers=0, epochs=1, scan=False)
    result = run_training(config, on_epoch_end=lambda record: _kill_self())
    assert result.interrupted and result.test_pending and result.stop_signal == "SIGTERM"
