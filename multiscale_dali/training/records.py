"""What a trainer reports: a record per epoch, an event per step, the result of a fit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    scales: tuple[int, ...]
    train: dict[int, dict[str, float]]
    val: dict[int, dict[str, float]]
    train_loss_components: dict[str, float]
    images_per_second: float
    seconds: float
    lr: float
    skipped_steps: int = 0
    is_best: bool = False
    # Validation of the weight EMA, beside the raw weights' ``val``; empty without an EMA.
    val_ema: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        ema = {"val_ema": {str(s): m for s, m in self.val_ema.items()}} if self.val_ema else {}
        return {
            "epoch": self.epoch,
            "scales": list(self.scales),
            "train": {str(s): m for s, m in self.train.items()},
            "val": {str(s): m for s, m in self.val.items()},
            "train_loss_components": self.train_loss_components,
            "images_per_second": self.images_per_second,
            "seconds": self.seconds,
            "lr": self.lr,
            "skipped_steps": self.skipped_steps,
            "is_best": self.is_best,
        } | ema


@dataclass(frozen=True)
class StepEvent:
    """Sent after every optimisation step (progress display, step checkpoints)."""

    epoch: int
    step: int  # steps done in this epoch
    global_step: int
    batch_size: int
    # The step's total loss, detached and still on the device: calling .item() forces a device
    # sync, so a progress display should read it only every few steps. None when unknown.
    loss: torch.Tensor | None = None


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    interrupted: bool = False
