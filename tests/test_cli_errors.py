"""The command line's shape: one module per command, user errors translated in one place, one scale parser."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from multiscale_dali.cli.main import MsdaliGroup, main
from multiscale_dali.data.discovery import DataError
from multiscale_dali.data.scan import BadImagesError
from multiscale_dali.errors import ConfigError, UserError
from multiscale_dali.evaluation.evaluate import ImageError
from multiscale_dali.evaluation.export import ExportError, OnnxInputError
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.models.registry import ModelError
from multiscale_dali.models.timm_models import TimmModelError
from multiscale_dali.pipelines.schedule import parse_scales
from multiscale_dali.reporting.plot import PlotError
from multiscale_dali.training.checkpoint import CheckpointError
from multiscale_dali.training.distributed import DistributedError
from multiscale_dali.training.finetune_res import FixResError
from multiscale_dali.training.run_directory import RunDirectoryError
from multiscale_dali.training.trainer import NonFiniteLossError

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "multiscale_dali" / "cli"
COMMANDS = ("train", "evaluate", "predict", "export", "finetune-res", "scan", "pack", "benchmark", "plot", "models",
            "recipes")
MAX_FUNCTION_LINES = 60


# ---------------------------------------------------------------------------------------- one base error
@pytest.mark.parametrize("error_class, builtin", [
    (ConfigError, ValueError), (DataError, ValueError), (ModelError, ValueError), (RunDirectoryError, ValueError),
    (CheckpointError, RuntimeError), (BadImagesError, ValueError), (PlotError, ValueError),
    (ImageError, ValueError), (DistributedError, RuntimeError), (MissingExtraError, RuntimeError),
    (ExportError, ValueError), (OnnxInputError, ValueError), (FixResError, ValueError), (TimmModelError, ValueError),
])
def test_user_errors_share_one_base_and_keep_their_builtin_one(error_class, builtin):
    assert issubclass(error_class, UserError) and issubclass(error_class, builtin)


def _raising(error: Exception) -> click.Group:
    group = MsdaliGroup()

    @group.command()
    def boom() -> None:
        raise error

    return group


@pytest.mark.parametrize("error, exit_code, output", [
    (DataError("/x is empty"), 2, "Error: --data: /x is empty"),
    (ModelError("unknown model 'm'"), 2, "Error: --model: unknown model 'm'"),
    (RunDirectoryError("runs/a holds a run"), 2, "Error: --out: runs/a holds a run"),
    (CheckpointError("checkpoint not found: c.pt"), 2, "Error: --resume: checkpoint not found: c.pt"),
    (ConfigError("batch_size", "must be >= 1, got 0"), 2, "Error: --batch-size: must be >= 1, got 0"),
    (BadImagesError("1 bad image: a.jpg"), 1, "Error: 1 bad image: a.jpg\nOr train without them: --on-bad-file skip."),
    (PlotError("metrics.jsonl not found"), 1, "Error: metrics.jsonl not found"),
    (ImageError("cannot read image a.jpg"), 1, "Error: cannot read image a.jpg"),
    (DistributedError("ranks disagree"), 1, "Error: ranks disagree"),
    (MissingExtraError(feature="Plotting", extra="plot"), 1,
     "Error: Plotting needs the optional 'plot' dependencies: pip install 'multiscale-dali[plot]'"),
    (NonFiniteLossError("3 consecutive steps had a non-finite loss"), 1,
     "Error: 3 consecutive steps had a non-finite loss"),
])
def test_the_group_turns_each_user_error_into_its_message_and_exit_code(error, exit_code, output):
    result = CliRunner().invoke(_raising(error), ["boom"])
    assert result.exit_code == exit_code
    assert result.output.rstrip("\n") == output


def test_other_errors_are_left_alone_for_a_traceback():
    result = CliRunner().invoke(_raising(RuntimeError("a bug")), ["boom"])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


# ---------------------------------------------------------------------------------------- one scale parser
@pytest.mark.parametrize("value, expected", [("64,96,128", (64, 96, 128)), (" 32, 48 ,", (32, 48)),
                                             ([16, 24], (16, 24)), ((8,), (8,))])
def test_parse_scales_accepts_text_and_lists(value, expected):
    assert parse_scales(value) == expected


@pytest.mark.parametrize("value, named", [("16.5,32", "16.5"), ([16.5, 32], "16.5"), ("a,b", "'a'"),
                                          ([True], "True"), ("0,64", "0"), ("-8,64", "-8"), ("64,32", "64,32"),
                                          ("32,32", "32,32"), ("", "holds no scale"), ([], "holds no scale")])
def test_parse_scales_refuses_bad_lists_naming_the_value(value, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_scales(value)


def _invoke(command: str, scales: str) -> str:
    args = {
        "train": ["train", "--out", "unused"],
        "evaluate": ["evaluate", "--checkpoint", "unused.pt"],
        "predict": ["predict", "--checkpoint", "unused.pt", "unused.jpg"],
        "benchmark": ["benchmark", "--model", "none"],
    }[command]
    result = CliRunner().invoke(main, [*args, "--scales", scales])
    assert result.exit_code == 2, result.output
    return result.output


@pytest.mark.parametrize("scales", ["16.5,32", "64,32", "0,32"])
def test_every_scales_flag_refuses_a_bad_list_with_the_same_message(scales):
    messages = {command: _invoke(command, scales) for command in ("train", "evaluate", "predict", "benchmark")}
    assert len(set(messages.values())) == 1, messages
    assert next(iter(messages.values())).startswith("Error: --scales: ")


# ---------------------------------------------------------------------------------------- the modules
def test_each_command_lives_in_a_module_of_its_own():
    for name in COMMANDS:
        command = main.commands[name]
        assert command.callback.__module__ == f"multiscale_dali.cli.{name.replace('-', '_')}"
    assert set(main.commands) == set(COMMANDS)


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_no_cli_function_is_longer_than_the_style_guide_allows(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "multiscale_dali.cli", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in COMMANDS)


# ---------------------------------------------------------------------------------------- the training recipe
@pytest.mark.parametrize("args, flag, allowed", [
    (["--mixup", "-1"], "--mixup", ">= 0"),
    (["--cutmix", "nan"], "--cutmix", "finite"),
    (["--label-smoothing", "1.0"], "--label-smoothing", "[0, 1)"),
    (["--ema-decay", "1.5"], "--ema-decay", "(0, 1)"),
    (["--ema-decay", "-0.1"], "--ema-decay", "(0, 1)"),
    (["--auto-augment", "rand", "--rand-m", "40"], "--rand-m", "0..30"),
    (["--auto-augment", "rand", "--rand-n", "0"], "--rand-n", ">= 1"),
    (["--auto-augment", "foo"], "--auto-augment", "'none', 'trivial', 'rand', 'auto'"),
    (["--random-erase", "1.5"], "--random-erase", "[0, 1]"),
    (["--mixup", "0.2", "--mix-prob", "2"], "--mix-prob", "[0, 1]"),
    (["--mixup", "0.2", "--cutmix", "1", "--mix-switch-prob", "-1"], "--mix-switch-prob", "[0, 1]"),
    (["--select-on", "best"], "--select-on", "'ema', 'raw'"),
])
def test_an_out_of_range_recipe_value_is_one_line_naming_the_flag_and_range_before_any_data_is_read(
        tmp_path, args, flag, allowed):
    # --data does not exist: reading it first would fail on --data instead.
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r"),
                                       *args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and flag in errors[0] and allowed in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, flag, needs", [
    (["--select-on", "ema"], "--select-on", "--ema-decay"),
    (["--select-on", "raw"], "--select-on", "--ema-decay"),
    (["--rand-n", "3"], "--rand-n", "--auto-augment rand"),
    (["--auto-augment", "trivial", "--rand-m", "5"], "--rand-m", "--auto-augment rand"),
    (["--mix-prob", "0.5"], "--mix-prob", "--mixup or --cutmix"),
    (["--mixup", "0.2", "--mix-switch-prob", "0.3"], "--mix-switch-prob", "both --mixup and --cutmix"),
])
def test_a_recipe_option_that_would_do_nothing_is_refused_naming_what_it_needs(tmp_path, args, flag, needs):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r"),
                                       *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {flag}: ") and needs in result.output
    assert len(result.output.strip().splitlines()) == 1
