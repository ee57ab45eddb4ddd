"""Inputs that used to end in a raw traceback: each is now one line and an exit code (2: fix the
command line; 1: the data, the disk or the machine), and nothing already written is lost."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import make_jpeg_folder, make_spec
from multiscale_dali.cli.main import MsdaliGroup, main
from multiscale_dali.fileio import WriteError, atomic_write_text
from multiscale_dali.pipelines.spec import DataReadError, worker_message
from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader
from multiscale_dali.training.run_directory import append_json_line

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_line_error(result: Result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError))
    assert result.output.startswith("Error: ") or "\nError: " in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three") / "images"
    make_jpeg_folder(root, classes=3, per_class=4, sizes=[(40, 40)])
    return root


# ---------------------------------------------------------------------------------------- train flags
def test_a_binary_task_on_three_classes_names_the_task_flag(tmp_path, three_classes):
    result = _invoke("train", "--data", str(three_classes), "--out", str(tmp_path / "run"), "--task", "binary",
                     "--backend", "torchvision", "--no-scan", "--workers", "0")
    _one_line_error(result, 2, "--task", "3")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_out_below_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("keep me")
    result = _invoke("train", "--out", str(tmp_path / "file" / "run"), "--data", str(tmp_path / "none"))
    _one_line_error(result, 2, "--out", str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_binary_config_file_is_a_usage_error(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(bytes(range(256)))
    _one_line_error(_invoke("train", "--config", str(recipe)), 2, "--config", "not a text file")


def test_a_batch_of_one_for_a_batchnorm_model_is_refused_before_the_data_is_read(tmp_path):
    # The data does not exist: a --batch-size error proves the check runs first.
    result = _invoke("train", "--model", "efficientnet_b0", "--batch-size", "1", "--scales", "32",
                     "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"))
    _one_line_error(result, 2, "--batch-size", "efficientnet_b0", "one value per channel")


# ---------------------------------------------------------------------------------------- disk and memory
def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="No space left on device.*unchanged") as caught:
        atomic_write_text(target, "new")
    assert caught.value.exit_code == 1
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_a_full_disk_leaves_no_half_line_in_the_metrics(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    append_json_line(metrics, {"epoch": 0})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="earlier lines are kept"):
        append_json_line(metrics, {"epoch": 1})
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [{"epoch": 0}]


def _raising(error: BaseException) -> MsdaliGroup:
    group = MsdaliGroup()

    @group.command()
    def boom() -> None:
        raise error

    return group


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 30000000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                 "  File \"x.py\", line 1, in f\nRuntimeError: DefaultCPUAllocator: can't allocate memory"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_that_says_what_to_lower(error):
    result = CliRunner().invoke(_raising(error), ["boom"])
    _one_line_error(result, 1, "out of memory", "--batch-size", "--scales")


def test_an_os_error_under_a_command_is_one_line(tmp_path):
    error = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "gone.jpg"))
    _one_line_error(CliRunner().invoke(_raising(error), ["boom"]), 1, "gone.jpg")


# ---------------------------------------------------------------------------------------- images deleted mid-run
@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_deleted_during_a_run_is_named_in_one_line(tmp_path, workers):
    files, labels = make_jpeg_folder(tmp_path / "images", classes=2, per_class=2, sizes=[(40, 40)])
    os.unlink(files[1])
    loader = TorchvisionLoader(make_spec(files, labels, num_workers=workers))
    try:
        with pytest.raises(DataReadError) as caught:
            list(loader.epoch(0))
    finally:
        loader.close()
    message = str(caught.value)
    assert files[1] in message and "Traceback" not in message and "\n" not in message


def test_worker_message_keeps_only_the_original_error():
    wrapped = DataReadError("Caught DataReadError in DataLoader worker process 0.\nOriginal Traceback (most "
                            "recent call last):\n  File \"a.py\", line 3\nmultiscale_dali.x.DataReadError: cannot "
                            "read image file 'a.jpg': gone")
    assert worker_message(wrapped) == "cannot read image file 'a.jpg': gone"


@needs_dali
def test_dali_names_an_image_deleted_during_a_run(tmp_path):
    from multiscale_dali.pipelines.dali.loader import DaliLoader

    files, labels = make_jpeg_folder(tmp_path / "images", classes=2, per_class=2, sizes=[(40, 40)])
    os.unlink(files[2])
    loader = DaliLoader(make_spec(files, labels, num_workers=1))
    try:
        with pytest.raises(DataReadError, match=files[2]) as caught:
            list(loader.epoch(0))
    finally:
        loader.close()
    assert "\n" not in str(caught.value)


@needs_dali
def test_dali_reports_an_allocation_failure_as_out_of_memory_not_a_bad_image():
    from multiscale_dali.errors import OutOfMemoryError
    from multiscale_dali.pipelines.dali.loader import _dali_error

    dali_said = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.resize`,\nwhich was "
                             "used in the pipeline definition with the following traceback:\n\n  File \"g.py\"\n\n"
                             "encountered:\n\nstd::bad_alloc\nCurrent pipeline object is no longer valid.")
    error = _dali_error(dali_said, make_spec(["a.jpg"], [0]), 0)
    assert isinstance(error, OutOfMemoryError) and "bad_alloc" in str(error) and "64 px" in str(error)


@needs_dali
def test_a_dali_batch_larger_than_the_data_is_capped_at_the_data(tmp_path):
    from multiscale_dali.pipelines.dali.loader import DaliLoader

    files, labels = make_jpeg_folder(tmp_path / "images", classes=2, per_class=2, sizes=[(40, 40)])
    # Uncapped, DALI reserves buffers for 10^8 images and fails with std::bad_alloc.
    loader = DaliLoader(make_spec(files, labels, batch_size=10**8, train=True, num_workers=1))
    try:
        batches = list(loader.epoch(0))
    finally:
        loader.close()
    assert len(batches) == 1 and batches[0].labels.shape[0] == len(files)


# ---------------------------------------------------------------------------------------- other commands
def test_a_benchmark_of_a_folder_with_a_corrupt_image_names_it(tmp_path):
    files, _ = make_jpeg_folder(tmp_path / "images", classes=2, per_class=3, sizes=[(40, 40)])
    Path(files[0]).write_bytes(Path(files[0]).read_bytes()[:200])
    result = _invoke("benchmark", "--data", str(tmp_path / "images"), "--backends", "torchvision", "--model", "none",
                     "--iters", "1", "--repeats", "1", "--warmup", "0", "--scales", "32", "--workers", "0")
    _one_line_error(result, 1, "--data", files[0])


@pytest.mark.parametrize("metrics, config", [
    ("[1, 2]\n", "{}"),
    ('{"epoch": "one"}\n', "{}"),
    ('{"epoch": 0, "train": {"32": {"loss": 1.0}}}\n', "not json"),
    ('{"epoch": 0, "train": {"32": {"loss": 1.0}}}\n', '{"config": {}}'),
    ('{"epoch": 0, "train": 5}\n', '{"config": {}, "schedule": {"stages": [[0, [32]]]}}'),
])
def test_plot_of_malformed_run_files_is_one_line(tmp_path, metrics, config):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(metrics)
    (tmp_path / "config.json").write_text(config)
    _one_line_error(_invoke("plot", str(tmp_path)), 1, str(tmp_path))
