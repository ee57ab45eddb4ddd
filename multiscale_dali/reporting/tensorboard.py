"""Per-epoch metrics into TensorBoard event files (``RUN_DIR/tensorboard``), an optional extra.

The scalars are the ones ``metrics.jsonl`` holds, under names that group well in TensorBoard's
UI: ``loss/train_96px``, ``accuracy/val_128px``, ``loss_components/consistency``, ``lr``,
``images_per_second``, ``epoch_seconds``; the step axis is the epoch number (1-based, as printed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multiscale_dali.extras import MissingExtraError
from multiscale_dali.training.trainer import EpochRecord

TENSORBOARD_DIR = "tensorboard"

def summary_writer_class() -> Any:
    try:
        # torch.utils.tensorboard itself imports the tensorboard package and raises ImportError
        # (with a message about versions) when it is absent.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingExtraError(feature="TensorBoard logging", extra="tensorboard", cause=err) from None
    return SummaryWriter


def epoch_scalars(record: EpochRecord) -> dict[str, float]:
    """The scalars of one epoch, by TensorBoard tag."""
    scalars: dict[str, float] = {}
    for split, by_scale in (("train", record.train), ("val", record.val), ("val_ema", record.val_ema)):
        for scale, metrics in by_scale.items():
            for name, value in metrics.items():
                scalars[f"{name}/{split}_{scale}px"] = float(value)
    for name, value in record.train_loss_components.items():
        scalars[f"loss_components/{name}"] = float(value)
    scalars["lr"] = float(record.lr)
    scalars["images_per_second"] = float(record.images_per_second)
    scalars["epoch_seconds"] = float(record.seconds)
    return scalars


class TensorBoardLogger:
    """``log_epoch`` after every epoch; ``close`` flushes the event file."""

    def __init__(self, run_dir: str | Path) -> None:
        writer_class = summary_writer_class()
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = writer_class(log_dir=str(self.log_dir))

    def log_epoch(self, record: EpochRecord) -> None:
        step = record.epoch + 1
        for tag, value in epoch_scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        # Flushed per epoch: a run killed later still shows every finished epoch.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
