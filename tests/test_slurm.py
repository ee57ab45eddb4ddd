"""The SLURM job script: its essentials, and its launch/requeue logic run against stub srun/scontrol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "slurm" / "train.sbatch"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

SRUN_STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
if [[ -n "${STUB_SLEEP:-}" ]]; then
  sleep "$STUB_SLEEP" & child=$!
  trap 'echo TERM > "$STUB_DIR/srun.signal"; kill $child; exit "${STUB_TERM_RC:-1}"' TERM
  touch "$STUB_DIR/srun.started"
  wait $child
fi
exit "${STUB_RC:-0}"
"""
SCONTROL_STUB = """#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf 'node-a\\nnode-b\\nnode-c\\n'; exit 0; fi
echo "$@" >> "$STUB_DIR/scontrol.calls"
"""


def _directives() -> list[str]:
    return [line.split(None, 1)[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_the_script_is_valid_bash():
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


def test_the_job_asks_for_a_warning_signal_and_can_be_requeued():
    directives = _directives()
    assert "--signal=B:USR1@120" in directives
    assert "--requeue" in directives
    assert "--ntasks-per-node=1" in directives  # one torchrun per node


def test_torchrun_rendezvous_is_c10d_on_the_first_node_with_every_node():
    text = SCRIPT.read_text()
    assert re.search(r'scontrol show hostnames "\$\{SLURM_JOB_NODELIST\}" \| head -n 1', text)
    assert '--nnodes "${SLURM_NNODES}"' in text
    assert "--rdzv-backend c10d" in text
    assert "--resume auto" in text


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def _env(stubs: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}", "STUB_DIR": str(stubs),
            "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "msdali", "SLURM_NNODES": "3",
            "SLURM_JOB_NODELIST": "node-[a-c]", "SLURM_GPUS_ON_NODE": "4", "DATA_DIR": "/shared/imagenet",
            "RUNS_DIR": "/shared/runs", "CONTAINER": "none", **extra}


def _launch(stubs: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([BASH, str(SCRIPT), *args], env=_env(stubs, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _requeues(stubs: Path) -> list[str]:
    calls = stubs / "scontrol.calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_finished_run_launches_torchrun_on_every_node_and_is_not_requeued(stubs):
    job = _launch(stubs, "--epochs", "1")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    args = (stubs / "srun.args").read_text().splitlines()
    torchrun = args[args.index("torchrun"):]
    assert torchrun[:12] == ["torchrun", "--nnodes", "3", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                             "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "42", "-m"]
    assert torchrun[-8:] == ["--data", "/shared/imagenet", "--out", "/shared/runs/msdali-42", "--resume", "auto",
                             "--epochs", "1"]
    assert _requeues(stubs) == []


def test_an_interrupted_run_is_requeued_and_a_failed_one_is_not(stubs):
    job = _launch(stubs, STUB_RC="75")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert _requeues(stubs) == ["requeue 42"]
    (stubs / "scontrol.calls").unlink()
    job = _launch(stubs, STUB_RC="3")
    job.communicate(timeout=60)
    assert job.returncode == 3 and _requeues(stubs) == []


def test_the_time_limit_signal_stops_the_step_and_requeues_the_job(stubs):
    job = _launch(stubs, STUB_SLEEP="30")
    _signal_when_started(job, stubs)  # SIGUSR1: what --signal=B:USR1@120 sends
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert (stubs / "srun.signal").read_text().strip() == "TERM"
    assert _requeues(stubs) == ["requeue 42"]
    assert "asking every rank to checkpoint" in output


def _signal_when_started(job: subprocess.Popen, stubs: Path) -> None:
    deadline = time.monotonic() + 30
    while not (stubs / "srun.started").exists():
        assert time.monotonic() < deadline and job.poll() is None, job.stdout.read()
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)


def test_a_run_that_finishes_as_the_signal_comes_is_not_requeued(stubs):
    job = _launch(stubs, STUB_SLEEP="30", STUB_TERM_RC="0")
    _signal_when_started(job, stubs)
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert _requeues(stubs) == []


def test_requeues_stop_at_the_limit(stubs):
    job = _launch(stubs, STUB_RC="75", SLURM_RESTART_COUNT="20")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 1 and "not again" in output
    assert _requeues(stubs) == []


def test_the_container_gets_the_data_read_only(stubs):
    job = _launch(stubs, CONTAINER="pyxis", IMAGE="/images/msdali.sqsh")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    args = (stubs / "srun.args").read_text().splitlines()
    assert "--container-image=/images/msdali.sqsh" in args
    assert "--container-mounts=/shared/imagenet:/data:ro,/shared/runs:/runs" in args
    assert args[args.index("--data") + 1] == "/data"


def test_an_unknown_container_runtime_is_refused(stubs):
    job = _launch(stubs, CONTAINER="docker")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 2 and "CONTAINER must be" in output
