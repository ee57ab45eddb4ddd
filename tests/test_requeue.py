"""The requeue signal: SIGUSR1 (the default inside a SLURM job) checkpoints at the next step, the process
exits 75, and `--resume auto` finishes the run; sent as a real signal, to a real `msdali train` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_jpeg_folder
from multiscale_dali.cli.main import main
from multiscale_dali.constants import EXIT_REQUEUE
from multiscale_dali.pipelines.factory import dali_installed
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.run import run_training

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI"))]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("requeue") / "images"
    make_jpeg_folder(root, classes=2, per_class=12, sizes=[(64, 48), (48, 64), (56, 56)])
    return root


def _args(image_root: Path, out: Path, backend: str, epochs: int) -> list[str]:
    return ["train", "--data", str(image_root), "--out", str(out), "--backend", backend, "--epochs", str(epochs),
            "--lr-schedule", "constant", "--scales", "32,48", "--batch-size", "4", "--model", "tiny_cnn",
            "--workers", "1" if backend == "dali" else "0", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigusr1_in_a_slurm_job_checkpoints_exits_75_and_resume_auto_finishes(tmp_path, image_root, backend):
    out = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "multiscale_dali.cli", *_args(image_root, out, backend, 500),
                                "--checkpoint-every", "1"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_REQUEUE, output
    assert "stopped by SIGUSR1 (requeue signal); checkpoint saved" in output and "--resume auto" in output
    stopped = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["trainer"]
    assert stopped["epoch"] < 500
    # The requeued job: the same command with --resume auto (one epoch past the stop, to keep it short).
    epochs = stopped["epoch"] + 1
    resumed = CliRunner().invoke(main, [*_args(image_root, out, backend, epochs), "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(
        range(epochs))
    assert (out / "results.json").exists()


def test_the_requeue_signal_stops_like_sigterm_and_says_which(tmp_path, image_root):
    """In this process: os.kill at a known step, so the checkpoint's position is exact."""
    config = TrainConfig(data=str(image_root), out=str(tmp_path / "run"), backend="torchvision", scales=(32,),
                         batch_size=4, workers=0, epochs=2, device="cpu", scan=False)

    def warn_at_step_2(event):
        if event.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)

    result = run_training(config, on_step=warn_at_step_2, requeue_signal=signal.SIGUSR2)
    assert result.interrupted and result.requeue and result.stop_signal == "SIGUSR2"
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["trainer"]["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # the handler is removed after the run
