"""Graceful stop on SIGTERM/SIGINT, and on the requeue signal: the handler only sets a flag; the trainer
acts at a step boundary.

Doing real work inside a signal handler (saving a checkpoint mid-backward, say) would race with the
step in flight; polling a flag between steps keeps the saved state consistent.

The requeue signal (``--requeue-signal``, SIGUSR1 by default when ``SLURM_JOB_ID`` is set) is the
scheduler's "your time is nearly up" warning (``sbatch --signal=USR1@120``). It stops the run the same
way: every rank stops after the same step, rank 0 writes the checkpoint, and the process exits with
:data:`~multiscale_dali.constants.EXIT_REQUEUE`; the job is then requeued and ``--resume auto``
continues it. Without a handler SIGUSR1 would kill the process on the spot, checkpoint-less: its
default action is to terminate.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Mapping

from multiscale_dali.errors import ConfigError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The requeue signal when none is given and the process runs inside a SLURM job (Lightning's choice too).
SLURM_REQUEUE_SIGNAL = signal.SIGUSR1
SLURM_JOB_ENV = "SLURM_JOB_ID"
NO_SIGNAL = "none"
# Signals a user may name: the scheduler warnings. SIGTERM/SIGINT already stop the run; SIGKILL and
# SIGSTOP cannot be caught; the rest mean a crash or a terminal event, not a warning.
REQUEUE_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT,
                                               signal.SIGALRM, signal.SIGXCPU)


def resolve_requeue_signal(value: str | None, *, environ: Mapping[str, str] | None = None) -> signal.Signals | None:
    """The requeue signal: ``value`` (``SIGUSR1``, ``USR1``, ``usr1`` or ``none``), else SIGUSR1 inside a
    SLURM job (``SLURM_JOB_ID`` set) and none outside one. Raises :class:`ConfigError` naming the flag."""
    env = os.environ if environ is None else environ
    if value is None:
        return SLURM_REQUEUE_SIGNAL if env.get(SLURM_JOB_ENV) else None
    text = value.strip().upper()
    if text == NO_SIGNAL.upper():
        return None
    name = text if text.startswith("SIG") else f"SIG{text}"
    allowed = ", ".join(s.name for s in REQUEUE_SIGNALS)
    chosen = next((s for s in REQUEUE_SIGNALS if s.name == name), None)
    if chosen is None:
        raise ConfigError("requeue_signal", f"{value!r} is not one of {allowed} or {NO_SIGNAL}")
    return chosen


class StartupInterrupted(Exception):
    """A stop signal arrived before there was anything to checkpoint (start-up): stop at once."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} before training started")
        self.signal_name = signal_name


class StopRequest:
    """Context manager installing the flag-setting handlers; restores the previous ones on exit.

    ``requeue_signal``: also stop on this signal, and say so (:attr:`requeue`).
    ``immediate=True`` (start-up: reading the data, building the model) raises
    :class:`StartupInterrupted` from the handler instead: there is no step boundary to wait for and
    nothing to save, and a scan of a large dataset can take minutes. Set ``immediate`` to False once
    a stop should wait for a step boundary and a checkpoint.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *,
                 requeue_signal: signal.Signals | None = None, immediate: bool = False) -> None:
        self._signals = signals + ((requeue_signal,) if requeue_signal is not None else ())
        self._requeue_signal = requeue_signal
        self._previous: dict[signal.Signals, object] = {}
        self.signal_name: str | None = None
        self.immediate = immediate

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def requeue(self) -> bool:
        """True when the stop came from the requeue signal."""
        return self._requeue_signal is not None and self.signal_name == self._requeue_signal.name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if self.immediate:
                raise StartupInterrupted(self.signal_name)
            purpose = " (requeue)" if self.requeue else ""
            log.warning("%s received%s: stopping at the next step boundary and saving a checkpoint",
                        self.signal_name, purpose)
        elif signum == signal.SIGINT:
            # A second Ctrl-C means "now": give the user the default behaviour back.
            raise KeyboardInterrupt

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread (e.g. not inside a notebook
        # worker thread); there the run simply is not interruptible gracefully.
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
