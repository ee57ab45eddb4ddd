"""One run per run directory: a second run into a busy --out stops at once, a dead run's lock does not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from multiscale_dali.cli.main import main
from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.run_directory import RunDirectoryError
from multiscale_dali.training.run_lock import LOCK_FILE, RunDirectoryBusyError, RunLock, locked_run_directory

# A process that takes the lock the way msdali does and waits: the holder of a concurrent run.
HOLDER = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
handle.truncate(0); handle.write(f"{os.getpid()}\\n"); handle.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_lock_on_the_same_directory_is_refused_naming_the_holder(tmp_path: Path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunDirectoryBusyError, match=f"{out}.*pid {os.getpid()}"):
            RunLock(out).acquire()
    with RunLock(out):  # released: free again
        pass


def test_a_train_into_a_directory_another_process_is_using_exits_2(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(main, ["train", "--out", str(out), "--data", str(tmp_path / "none")])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    assert str(out) in result.output and f"pid {holder.pid}" in result.output
    assert "Traceback" not in result.output
    # Nothing of the other run's was touched: only its lock file is there.
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path: Path):
    out = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "lock")], stdout=subprocess.PIPE, text=True)
    dead.stdout.readline()
    dead.kill()
    dead.wait()
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")
    with RunLock(out) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_only_rank_0_takes_the_lock(tmp_path: Path):
    with RunLock(tmp_path / "run", enabled=False):
        assert not (tmp_path / "run").exists()
        with RunLock(tmp_path / "run"):  # rank 0's lock is free to take
            pass


def test_the_run_directory_stays_locked_while_the_block_runs(tmp_path: Path):
    out = tmp_path / "run"
    with locked_run_directory(out, DistributedContext()):
        with pytest.raises(RunDirectoryBusyError):
            RunLock(out).acquire()
    RunLock(out).acquire()


def test_an_out_below_a_file_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="cannot create the run directory") as caught:
        RunLock(tmp_path / "file" / "run").acquire()
    assert caught.value.exit_code == 2
