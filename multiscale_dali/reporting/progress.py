"""A progress bar per training epoch (tqdm), fed by the trainer's step events.

The bar counts images, so tqdm's rate is images/s. The loss shown is refreshed every
``loss_every`` steps only: reading a device tensor with ``.item()`` waits for the device to finish
the step, and doing that every step would serialise a GPU run. Without a terminal on the stream
(CI logs, pipes, redirected files) the bar turns itself off and the per-epoch lines stay readable.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from multiscale_dali.training.trainer import StepEvent

DEFAULT_LOSS_EVERY = 10


class EpochProgress:
    """``on_step`` per optimisation step, ``close()`` before printing the epoch's summary line.

    The first epoch's length is unknown up front (the trainer sees an iterator); the bar then shows
    a count and a rate, and later epochs, which have the same number of images, a full bar and ETA.
    """

    def __init__(self, *, epochs: int, stream: IO[str] | None = None, loss_every: int = DEFAULT_LOSS_EVERY,
                 enabled: bool | None = None) -> None:
        if loss_every < 1:
            raise ValueError(f"loss_every must be >= 1, got {loss_every}")
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stderr
        self.loss_every = loss_every
        # None: tqdm decides from stream.isatty(), which is what keeps CI logs free of bars.
        self.enabled = enabled
        self._bar: Any = None
        self._epoch: int | None = None
        self._first_step: int | None = None
        self._images_per_epoch: int | None = None

    @property
    def bar(self) -> Any:
        """The current epoch's tqdm bar (None between epochs)."""
        return self._bar

    def on_step(self, event: StepEvent) -> None:
        if self._epoch != event.epoch:
            self.close()
            self._open(event)
        self._bar.update(event.batch_size)
        if event.loss is not None and (event.step % self.loss_every == 0 or event.step == 1):
            self._bar.set_postfix(loss=f"{float(event.loss):.4f}", refresh=False)

    def _open(self, event: StepEvent) -> None:
        from tqdm import tqdm

        self._epoch, self._first_step = event.epoch, event.step
        self._bar = tqdm(
            total=self._images_per_epoch, desc=f"epoch {event.epoch + 1}/{self.epochs}", unit="img",
            file=self.stream, disable=None if self.enabled is None else not self.enabled, leave=False,
            dynamic_ncols=True, mininterval=0.5,
        )

    def close(self) -> None:
        """End the current bar; call before writing the epoch's line to the same terminal."""
        if self._bar is None:
            return
        # Only an epoch seen from its first step tells how many images an epoch has (a resumed
        # run starts mid-epoch).
        if self._first_step == 1 and self._images_per_epoch is None:
            self._images_per_epoch = int(self._bar.n)
        self._bar.close()
        self._bar, self._epoch = None, None

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CountProgress:
    """``on_progress(done, total)`` callback drawing a bar of ``unit`` items (scan, benchmark rounds).

    The bar opens on the first call, when the total is known, and only on a terminal (as above).
    """

    def __init__(self, *, desc: str, unit: str, stream: IO[str] | None = None, enabled: bool | None = None) -> None:
        self.desc, self.unit = desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self.stream, leave=False,
                             disable=None if self.enabled is None else not self.enabled, mininterval=0.5)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "CountProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
