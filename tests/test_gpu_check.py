"""The one-command GPU check: its no-CUDA path, its part runner and its pytest summary parsing."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiscale_dali.benchmark import gpu_check
from multiscale_dali.benchmark.gpu_check import FAILED, OK, PARTS, SKIPPED, PartSkipped, run_parts

REPO = Path(__file__).resolve().parent.parent


def test_without_cuda_every_part_is_skipped_and_the_exit_code_is_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "reports" / "gpu-check.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["device"] is None and report["ok"] is True
    assert set(report["parts"]) == set(PARTS)
    assert all(part == {"status": SKIPPED, "seconds": 0.0, "reason": gpu_check.NO_CUDA}
               for part in report["parts"].values())
    assert report["machine"]["torch"]
    assert not gpu_check.benchmark_json_path(out).exists()


def test_the_module_runs_as_a_command(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a GPU machine
    done = subprocess.run([sys.executable, "-m", "multiscale_dali.benchmark.gpu_check", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {part["status"] for part in json.loads(out.read_text())["parts"].values()} == {SKIPPED}


def test_parts_report_ok_skipped_and_failed_and_a_failure_does_not_stop_the_rest():
    def broken(left):
        raise RuntimeError("kernel exploded")

    def not_here(left):
        raise PartSkipped("DALI is not installed")

    results = run_parts({"a": lambda left: {"figure": 1.5}, "b": broken, "c": not_here,
                         "d": lambda left: {"left": left}}, budget_s=600)
    assert (results["a"].status, results["a"].figures) == (OK, {"figure": 1.5})
    assert results["b"].status == FAILED and "RuntimeError: kernel exploded" in results["b"].reason
    assert (results["c"].status, results["c"].reason) == (SKIPPED, "DALI is not installed")
    assert results["d"].status == OK and 0 < results["d"].figures["left"] <= 600
    assert results["a"].to_json() == {"status": OK, "seconds": results["a"].to_json()["seconds"], "figure": 1.5}


def test_parts_past_the_budget_are_skipped_with_the_reason():
    ticks = itertools.count(0, 100)  # each clock read advances 100 s
    ran = []
    results = run_parts({name: (lambda left, name=name: ran.append(name) or {}) for name in "abcd"},
                        budget_s=250, clock=lambda: float(next(ticks)))
    assert ran == ["a"]
    assert [results[n].status for n in "abcd"] == [OK, SKIPPED, SKIPPED, SKIPPED]
    assert "budget" in results["d"].reason


@pytest.mark.parametrize("output,expected", [
    ("....\n2 passed, 1 skipped, 40 deselected in 3.2s\n", {"passed": 2, "skipped": 1, "deselected": 40}),
    ("F.\n= 1 failed, 1 passed, 1 error in 1s =", {"failed": 1, "passed": 1, "errors": 1}),
    ("no tests ran", {}),
])
def test_pytest_summaries_are_counted(output, expected):
    assert gpu_check.parse_pytest_summary(output) == expected


def test_unknown_parts_to_skip_are_refused():
    with pytest.raises(ValueError, match="unknown parts"):
        gpu_check.GpuCheckConfig(skip=("nope",))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_check.torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_check_passes_on_a_cuda_machine(tmp_path):
    out = tmp_path / "gpu-check.json"
    # pytest_gpu is where this test runs from (make gpu-test); the benchmark part has its own tests.
    assert gpu_check.main(["--out", str(out), "--skip", "pytest_gpu", "--skip", "benchmark", "--synthetic", "128"]) == 0
    report = json.loads(out.read_text())
    assert report["parts"]["train_step"]["status"] == OK
    assert report["parts"]["step_memory"]["memory_efficient_vs_naive"] < 1.0
    memory = report["parts"]["step_memory"]
    assert memory["micro_batched_vs_naive"] <= memory["memory_efficient_vs_naive"]


def test_the_train_step_and_memory_parts_run_their_code_on_the_cpu(tmp_path, monkeypatch):
    """The CUDA parts' own code on the CPU (tiny model and images), so a GPU run only meets CUDA issues."""
    monkeypatch.setenv("MSDALI_CACHE", str(tmp_path / "cache"))
    config = gpu_check.GpuCheckConfig(model="tiny_cnn", scales=(32, 48), batch_size=4, synthetic=8, train_steps=2)
    figures = gpu_check._train_step_part(config, "cpu")(600.0)
    assert figures["channels_last_batches"] is True
    assert figures["amp_dtype"] == "None" and figures["steps"] == 2
    assert set(figures["loss"]) == {"32", "48"}
    memory = gpu_check._memory_part(config, "cpu")(600.0)
    assert set(memory["step_mib"]) == {"naive", "memory_efficient", "micro_batched"}
