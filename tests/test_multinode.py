"""Two "nodes" on one machine: two torchrun agents (one process each) meeting at a c10d rendezvous on
127.0.0.1, as ``docker/slurm/train.sbatch`` launches one per node. gloo on the CPU.

Inside a (pretend) SLURM job, the pair gets the requeue signal (SIGUSR1, which each agent forwards to
its rank with ``--signals-to-handle``): both ranks stop after the same step and rank 0 checkpoints. A
new pair (the requeued job) resumes with ``--resume auto``, and the run must end with the same files
and the same weights as one node running both processes without a break.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import make_jpeg_folder

from multiscale_dali.pipelines.factory import dali_installed

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = 150
# torchrun's default signals plus SIGUSR1, so an agent forwards the requeue signal instead of dying of it.
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
STOP_LINE = re.compile(r"rank (\d)/2 stopped by SIGUSR1 at epoch (\d+) step (\d+) \(global step (\d+)\)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multinode") / "data"
    make_jpeg_folder(root / "train", classes=2, per_class=8)
    for split in ("val", "test"):
        make_jpeg_folder(root / split, classes=2, per_class=3)
    return root


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"PYTHONPATH": str(ROOT), "MSDALI_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_args(data: Path, out: Path, backend: str, epochs: int, *extra: str) -> list[str]:
    return ["-m", "multiscale_dali.cli", "train", "--data", str(data), "--out", str(out), "--backend", backend,
            "--scales", "32,48", "--epochs", str(epochs), "--batch-size", "4", "--lr-schedule", "constant",
            "--workers", "1" if backend == "dali" else "0", "--device", "cpu", "--model", "tiny_cnn", "--no-scan",
            *extra]


def _wait(processes: list[subprocess.Popen], logs: list[Path], *, expect_success: bool = True) -> None:
    try:
        codes = [process.wait(timeout=LAUNCH_TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if expect_success:
        assert codes == [0] * len(processes), "\n".join(log.read_text()[-3000:] for log in logs)


def _two_nodes(args: list[str], *, env: dict[str, str], logs: Path, tag: str) -> tuple[list[subprocess.Popen],
                                                                                         list[Path]]:
    """One torchrun agent per "node", node 0 hosting the c10d store; both started, neither waited for."""
    port = _free_port()
    processes, files = [], []
    for node in (0, 1):
        log = logs / f"{tag}-node{node}.log"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", tag, "--rdzv-conf", f"is_host={int(node == 0)}", "--signals-to-handle", FORWARDED,
                   *args]
        with log.open("w") as handle:
            processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT))
        files.append(log)
    return processes, files


def _requeue_signal_when_checkpointed(processes: list[subprocess.Popen], checkpoint: Path, logs: list[Path]) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not checkpoint.exists():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            _wait(processes, logs, expect_success=False)
            pytest.fail("no checkpoint appeared:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
        time.sleep(0.02)
    for process in processes:  # what SLURM's --signal=USR1@N does: every node's launcher gets it
        process.send_signal(signal.SIGUSR1)
    _wait(processes, logs, expect_success=False)  # torchrun exits non-zero after a signal


def _one_node(args: list[str], *, env: dict[str, str], logs: Path) -> None:
    log = logs / "one-node.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    _wait([process], [log])


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Five launches of torch per backend (~40 s of CPU each): the suite's slowest test, worth it once per backend.
@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_installed(), reason="needs DALI"))])
def test_two_nodes_stop_on_the_requeue_signal_resume_and_match_one_node(tmp_path, dataset, backend):
    env, pair, single = _env(tmp_path / "cache"), tmp_path / "pair", tmp_path / "single"
    slurm = env | {"SLURM_JOB_ID": "4242"}  # the requeue signal defaults to SIGUSR1 inside a SLURM job
    processes, logs = _two_nodes(_train_args(dataset, pair, backend, 200, "--checkpoint-every", "1"), env=slurm,
                                 logs=tmp_path, tag="first")
    _requeue_signal_when_checkpointed(processes, pair / "checkpoints" / "last.pt", logs)
    stops = [STOP_LINE.search(log.read_text()) for log in logs]
    assert all(stops), "\n".join(log.read_text()[-3000:] for log in logs)
    assert sorted(int(m.group(1)) for m in stops) == [0, 1] and len({m.groups()[1:] for m in stops}) == 1
    stopped = torch.load(pair / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["world_size"] == 2 and stopped["trainer"]["global_step"] == int(stops[0].group(4))
    assert [state["spec"]["shard_id"] for state in stopped["loaders"]] == [0, 1]

    # The requeued job: a new pair continues the checkpoint (to the end of the next epoch, to keep it short).
    epochs = int(stopped["trainer"]["epoch"]) + 1
    resumed = _two_nodes(_train_args(dataset, pair, backend, epochs, "--resume", "auto"), env=slurm, logs=tmp_path,
                         tag="resumed")
    _wait(*resumed)
    # Both ranks on one node without a break, checkpointing as often (so the same files exist).
    _one_node(_train_args(dataset, single, backend, epochs, "--checkpoint-every", "1"), env=env, logs=tmp_path)

    assert _files(pair) == _files(single)
    for name in ("best.pt", "checkpoints/last.pt"):
        paired, alone = (torch.load(run / name, weights_only=True) for run in (pair, single))
        weights = (paired.get("model") or paired["trainer"]["model"], alone.get("model") or alone["trainer"]["model"])
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name
    assert [e["train"] for e in _epochs(pair)] == [e["train"] for e in _epochs(single)]
    results = [json.loads((run / "results.json").read_text()) for run in (pair, single)]
    assert results[0]["test"] == results[1]["test"] and results[0]["world_size"] == 2
