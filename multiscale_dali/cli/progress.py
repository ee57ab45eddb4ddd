"""What the commands show while they run: progress bars, and ``msdali train``'s line per epoch."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click

from multiscale_dali.errors import ConfigError
from multiscale_dali.extras import MissingExtraError


def bars_enabled() -> bool | None:
    """-q asks for warnings only: no progress bars either. Otherwise (None) tqdm shows them on a terminal only."""
    return False if logging.getLogger().getEffectiveLevel() > logging.INFO else None


def format_epoch(record: Any, epochs: int) -> str:
    train = " ".join(f"{s}px {m['loss']:.3f}/{m['accuracy']:.1%}" for s, m in record.train.items())
    val = " ".join(f"{s}px {m['loss']:.3f}/{m['accuracy']:.1%}" for s, m in record.val.items())
    ema = " ".join(f"{s}px {m['loss']:.3f}/{m['accuracy']:.1%}" for s, m in record.val_ema.items())
    best = " *" if record.is_best else ""
    return (f"epoch {record.epoch + 1:>3}/{epochs} | train loss/acc {train} | val {val or '-'} | "
            + (f"val EMA {ema} | " if ema else "")
            + f"{record.images_per_second:,.0f} img/s {record.seconds:.1f}s{best}")


class TrainReporter:
    """What `msdali train` shows per step and per epoch: progress bar, epoch line, TensorBoard scalars."""

    def __init__(self, *, epochs: int, out: str, tensorboard: bool) -> None:
        from multiscale_dali.reporting.progress import EpochProgress

        self.epochs = epochs
        self.out = out
        self.progress = EpochProgress(epochs=epochs, stream=sys.stderr, enabled=bars_enabled())
        self.tensorboard = tensorboard
        self._writer = None

    def step(self, event: Any) -> None:
        self.progress.on_step(event)

    def epoch_end(self, record: Any) -> None:
        self.progress.close()  # the bar leaves its line before the epoch's summary is printed
        click.echo(format_epoch(record, self.epochs))
        if self.tensorboard:
            if self._writer is None:  # created at the first epoch: a run refused at start leaves no folder
                from multiscale_dali.reporting.tensorboard import TensorBoardLogger

                self._writer = TensorBoardLogger(self.out)
            self._writer.log_epoch(record)

    def close(self) -> None:
        self.progress.close()
        if self._writer is not None:
            self._writer.close()


def check_extras(*, tensorboard: bool, plot: bool) -> None:
    """Refuse --tensorboard / --plot before training (not after an hour of it) when their extra is missing."""
    try:
        if tensorboard:
            from multiscale_dali.reporting.tensorboard import summary_writer_class

            summary_writer_class()
        if plot:
            from multiscale_dali.reporting.plot import check_plotting_available

            check_plotting_available()
    except MissingExtraError as err:
        # The flag asked for it, so the flag is what the message names (a usage error, exit 2).
        raise ConfigError("tensorboard" if err.extra == "tensorboard" else "plot", str(err)) from None


@contextmanager
def train_reporter(*, epochs: int, out: str, tensorboard: bool) -> Iterator[TrainReporter]:
    """Report a run; log lines go above the progress bar instead of through it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    reporter = TrainReporter(epochs=epochs, out=out, tensorboard=tensorboard)
    try:
        with logging_redirect_tqdm():
            yield reporter
    finally:
        reporter.close()
