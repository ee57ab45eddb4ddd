"""Graceful stop on SIGTERM/SIGINT: the handler only sets a flag; the trainer acts at a step boundary.

Doing real work inside a signal handler (saving a checkpoint mid-backward, say) would race with the
step in flight; polling a flag between steps keeps the saved state consistent.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupInterrupted(Exception):
    """A stop signal arrived before there was anything to checkpoint (start-up): stop at once."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} before training started")
        self.signal_name = signal_name


class StopRequest:
    """Context manager installing the flag-setting handlers; restores the previous ones on exit.

    ``immediate=True`` (start-up: reading the data, building the model) raises
    :class:`StartupInterrupted` from the handler instead: there is no step boundary to wait for and
    nothing to save, and a scan of a large dataset can take minutes. Set ``immediate`` to False once
    a stop should wait for a step boundary and a checkpoint.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *, immediate: bool = False) -> None:
        self._signals = signals
        self._previous: dict[signal.Signals, object] = {}
        self.signal_name: str | None = None
        self.immediate = immediate

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if self.immediate:
                raise StartupInterrupted(self.signal_name)
            log.warning("%s received: stopping at the next step boundary and saving a checkpoint",
                        self.signal_name)
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
