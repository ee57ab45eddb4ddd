"""One run per run directory: an exclusive ``flock`` on a lock file inside it, held for the whole run.

Two ``msdali train`` processes writing into the same ``--out`` would interleave their metrics and
overwrite each other's checkpoints while both exit 0. The kernel drops a ``flock`` when its holder
dies, however it dies (SIGKILL, out of memory, a node reboot), so a lock file left behind by a dead
run never blocks the next one; the file only carries the holder's pid for the error message.

The lock file is not deleted on release: removing it would let a process that opened the old file
and a process that creates a new one both "hold" the lock. One exception: a run refused before it
wrote anything (a bad flag found after the lock was taken) removes the directory it created, so a
refused command leaves no trace; two other runs racing for that same new directory in that instant
is the accepted cost.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Iterator

from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.run_directory import RunDirectoryError

LOCK_FILE = ".msdali.lock"


class RunDirectoryBusyError(RunDirectoryError):
    """Another live process holds the run directory's lock."""


class RunDirectoryIOError(RunDirectoryError, exit_code=1):
    """The disk failed the run directory (full, over quota, an I/O error): not the flag's fault."""


# Errors of the machine rather than of the --out given: exit 1, not the usage error 2.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def run_directory_error(err: OSError, what: str) -> RunDirectoryError:
    """``err`` (from creating or writing the run directory) as the user error to show."""
    cls = RunDirectoryIOError if err.errno in _DISK_ERRNOS else RunDirectoryError
    return cls(f"{what}: {err.strerror or err}")


def _holder_pid(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read().strip() or "unknown"


class RunLock:
    """Context manager: exclusive lock on ``out_dir`` (created if needed) or :class:`RunDirectoryBusyError`.

    ``enabled=False`` (every rank but 0 of a multi-process run) takes nothing: rank 0 holds the lock
    for all of them.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._handle: IO[str] | None = None
        self._created = False  # whether acquire() made out_dir (removed again if left empty)

    @property
    def path(self) -> Path:
        return self.out_dir / LOCK_FILE

    def acquire(self) -> None:
        if not self.enabled or self._handle is not None:
            return
        try:
            self._created = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115  # held open for the run, closed in release()
        except OSError as err:
            raise run_directory_error(err, f"cannot create the run directory {self.out_dir}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder_pid(handle)
            handle.close()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise run_directory_error(err, f"cannot lock {self.path}") from None
            raise RunDirectoryBusyError(
                f"{self.out_dir} is in use by another msdali run (pid {holder}); wait for it to finish, "
                "or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            # Closing the file drops the flock.
            self._handle.close()
            self._handle = None
            if self._created and [p.name for p in self.out_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                self.out_dir.rmdir()

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@contextmanager
def locked_run_directory(out_dir: str | os.PathLike[str], context: DistributedContext) -> Iterator[None]:
    """Rank 0 holds ``out_dir``'s lock for the block; a collective, so every rank fails together.

    Only rank 0 tries the lock (the others would find it taken by their own rank 0); its verdict is
    shared, so a refused run stops on every rank instead of leaving the others waiting in the next
    collective until the timeout.
    """
    lock = RunLock(out_dir, enabled=context.is_main)
    refused: RunDirectoryError | None = None
    try:
        lock.acquire()
    except RunDirectoryError as err:
        refused = err
    verdict = context.all_gather_object(None if refused is None else str(refused))[0]
    if refused is not None:
        raise refused
    if verdict is not None:
        raise RunDirectoryError(verdict)
    try:
        yield
    finally:
        lock.release()
