"""Bad input to the deployment commands (export, finetune-res, evaluate/predict, timm models, the requeue
signal): one line naming the problem, exit 2 (1 for a missing optional extra), nothing written."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from deploy_runs import make_split_folder, untrained_run
from multiscale_dali.cli.main import main
from multiscale_dali.errors import ConfigError
from multiscale_dali.training.signals import resolve_requeue_signal

needs_timm = pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is None, reason="needs timm")


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_line_error(result: Result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("errors") / "data")


def _edited(checkpoint: Path, out: Path, **changes) -> Path:
    """A copy of ``checkpoint`` whose payload says another model or task than its weights are."""
    payload = torch.load(checkpoint, weights_only=True)
    config = dict(payload["config"])
    if "model" in changes:
        config["model"] = changes.pop("model")
    torch.save(payload | changes | {"config": config}, out)
    return out


def _commands(checkpoint: Path, tmp_path: Path, image: str, scale: int) -> dict[str, list[str]]:
    common = ["--backend", "torchvision", "--workers", "0", "--device", "cpu"]
    return {
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), "--scales", str(scale), *common],
        "predict": ["predict", "--checkpoint", str(checkpoint), image, "--scale", str(scale), "--device", "cpu"],
        "export": ["export", "--checkpoint", str(checkpoint), "--scale", str(scale), "--out", str(tmp_path / "m.onnx")],
        "finetune-res": ["finetune-res", "--checkpoint", str(checkpoint), "--scale", str(scale),
                         "--out", str(tmp_path / "ft"), *common],
    }


@pytest.mark.parametrize("change, named", [
    ({"model": "resnet18"}, "do not fit resnet18 with 3 output(s) for the multiclass task"),
    ({"task": "binary", "classes": ["a", "b"]}, "do not fit tiny_cnn with 1 output(s) for the binary task"),
], ids=["another-model", "another-task"])
def test_a_checkpoint_whose_weights_are_another_model_or_task_is_refused_by_every_command(data, tmp_path, change,
                                                                                          named):
    checkpoint = _edited(untrained_run(data, tmp_path / "run", model="tiny_cnn"), tmp_path / "edited.pt", **change)
    image = str(next((data / "test").rglob("*.jpg")))
    for command, args in _commands(checkpoint, tmp_path, image, 32).items():
        line = _one_line_error(_cli(*args))
        assert line.startswith(f"Error: --checkpoint: {checkpoint}: its weights {named}"), (command, line)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()


@needs_timm
def test_a_scale_the_model_cannot_run_at_is_refused_by_every_command_before_any_work(data, tmp_path):
    checkpoint = untrained_run(data, tmp_path / "vit", model="timm:test_vit", scales=(32,))
    image = str(next((data / "test").rglob("*.jpg")))
    for command, args in _commands(checkpoint, tmp_path, image, 40).items():
        line = _one_line_error(_cli(*args))
        assert line.startswith("Error: --model: timm:test_vit: VisionTransformer does not run at 40 px"), (command, line)
        assert "divisible by its patch size" in line
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "ft").exists()


@needs_timm
def test_timm_models_are_listed_and_an_unknown_one_is_refused(tmp_path):
    listed = _cli("models", "--timm", "test_vi*")
    assert listed.exit_code == 0 and "timm:test_vit\n" in listed.output
    assert all(line.startswith("timm:test_vi") for line in listed.output.splitlines())
    line = _one_line_error(_cli("train", "--model", "timm:no_such_net", "--out", str(tmp_path / "r")))
    assert "unknown timm model 'no_such_net'" in line and "msdali models --timm" in line
    assert not (tmp_path / "r").exists()


def test_without_timm_the_model_commands_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    for args in (["models", "--timm", "resnet*"], ["train", "--model", "timm:resnet18", "--out", str(tmp_path / "r")]):
        line = _one_line_error(_cli(*args), exit_code=1)
        assert "pip install 'multiscale-dali[timm]'" in line


def test_the_requeue_signal_defaults_to_sigusr1_inside_slurm_only_and_refuses_others():
    assert resolve_requeue_signal(None, environ={"SLURM_JOB_ID": "7"}) == signal.SIGUSR1
    assert resolve_requeue_signal(None, environ={}) is None
    assert resolve_requeue_signal("none", environ={"SLURM_JOB_ID": "7"}) is None
    assert resolve_requeue_signal("usr2", environ={}) == signal.SIGUSR2
    assert resolve_requeue_signal("SIGUSR1", environ={}) == signal.SIGUSR1
    for bad in ("SIGTERM", "SIGKILL", "foo"):
        with pytest.raises(ConfigError, match=r"is not one of SIGUSR1, SIGUSR2.* or none") as caught:
            resolve_requeue_signal(bad, environ={})
        assert caught.value.flag == "--requeue-signal"


def test_a_bad_requeue_signal_is_refused_before_training(tmp_path):
    line = _one_line_error(_cli("train", "--requeue-signal", "SIGKILL", "--out", str(tmp_path / "r")))
    assert line.startswith("Error: --requeue-signal: 'SIGKILL' is not one of")
    assert not (tmp_path / "r").exists()
