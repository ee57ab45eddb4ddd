"""Trainers that take :class:`MultiScaleBatch` tensors already on the device.

``MultiScaleTrainer`` runs every scale of the schedule each step (base loss averaged over scales
plus the scale-consistency term); ``ProgressiveMultiScaleTrainer`` is the same engine fed a schedule
of one growing scale, validated at the current and at the final scale. Neither knows which backend
produced the batches.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from multiscale_dali.batch import MultiScaleBatch
from multiscale_dali.losses import ScaleConsistencyLoss, base_loss, predict
from multiscale_dali.metrics import ScaleMeter
from multiscale_dali.schedule import ScaleSchedule

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a NaN/inf loss."""


class MultiScaleModel(nn.Module):
    """Runs one network on every scale inside a single ``forward``.

    DDP expects one forward per backward; several forwards of the bare network before one backward
    can raise "marked ready twice". Wrapping the scales here keeps the step DDP-friendly.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {scale: self.net(x) for scale, x in images.items()}


@dataclass(frozen=True)
class TrainerOptions:
    epochs: int
    amp_dtype: torch.dtype | None = None  # None: full precision
    grad_clip_norm: float | None = None
    memory_efficient: bool = False
    max_consecutive_nonfinite: int = 5
    log_every: int = 0  # steps between progress log lines; 0 = only per epoch

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, float16 or bfloat16, got {self.amp_dtype}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0, got {self.grad_clip_norm}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(
                f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}"
            )


@dataclass
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

    def to_json(self) -> dict:
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
        }


@dataclass(frozen=True)
class StepEvent:
    """Sent after every optimisation step (progress display, step checkpoints)."""

    epoch: int
    step: int  # steps done in this epoch
    global_step: int
    batch_size: int


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_accuracy: float | None = None
    interrupted: bool = False


class MultiScaleTrainer:
    """All scales of ``schedule.scales_at(epoch)`` every step; validation on every scale."""

    mode = "multiscale"

    def __init__(
        self,
        model: nn.Module,
        *,
        loss: ScaleConsistencyLoss,
        optimizer: torch.optim.Optimizer,
        schedule: ScaleSchedule,
        options: TrainerOptions,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = model  # the bare network: what checkpoints and evaluation use
        self.model: nn.Module = MultiScaleModel(model)
        self.loss = loss
        self.task = loss.task
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.schedule = schedule
        self.options = options
        # GradScaler only for float16: bfloat16 has float32's exponent range and needs no scaling.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=options.amp_dtype == torch.float16
        )
        self.epoch = 0
        self.global_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_score: tuple[float, float] | None = None
        self.best_epoch: int | None = None
        self._nonfinite_in_a_row = 0
        # Position inside the current epoch: a checkpoint taken mid-epoch resumes exactly here.
        self.step_in_epoch = 0
        self._meter: ScaleMeter | None = None
        self._meter_epoch = -1
        self._epoch_seconds = 0.0

    # ------------------------------------------------------------------ hooks for subclasses
    def train_scales(self, epoch: int) -> tuple[int, ...]:
        return self.schedule.scales_at(epoch)

    def validation_scales(self, epoch: int) -> tuple[int, ...]:
        return self.schedule.scales_at(epoch)

    def selection_scale(self, epoch: int) -> int:
        """The scale whose validation accuracy picks the best model."""
        return max(self.validation_scales(epoch))

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(
            self.device.type,
            dtype=self.options.amp_dtype or torch.float32,
            enabled=self.options.amp_dtype is not None,
        )

    def _step(self, batch: MultiScaleBatch, meter: ScaleMeter) -> bool:
        """One optimisation step; False when it was skipped for a non-finite loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.options.memory_efficient and len(batch.images) > 1:
            total, components, logits = self._backward_one_scale_at_a_time(batch)
        else:
            with self._autocast():
                logits = self.model(batch.images)
                total, components = self.loss(logits, batch.labels)
            if torch.isfinite(total):
                self.scaler.scale(total).backward()
        if not torch.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite_in_a_row += 1
            meter.skipped += 1
            log.warning("non-finite loss at step %d: step skipped", self.global_step)
            if self._nonfinite_in_a_row >= self.options.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self._nonfinite_in_a_row} consecutive steps had a non-finite loss "
                    f"(last at global step {self.global_step}); stopping. Lower the learning rate, "
                    "enable --grad-clip, or try --amp off."
                )
            return False
        self._nonfinite_in_a_row = 0
        if self.options.grad_clip_norm is not None:
            # Clip the true gradients: unscale first, or the threshold applies to scaled values.
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.options.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        for scale, out in logits.items():
            # The loss already computed each scale's base loss; only accuracy is new work.
            meter.update(scale, components[f"base_{scale}"], predict(out, task=self.task) == batch.labels,
                         batch.batch_size)
        meter.add_samples(batch.batch_size)
        meter.add_components(components, batch.batch_size)
        return True

    def _backward_one_scale_at_a_time(self, batch: MultiScaleBatch):
        """Largest scale first, then each smaller scale against the detached largest-scale target.

        Only one scale's activations are alive at a time; the gradients equal the naive step's when
        the teacher is the detached largest scale (the consistency term does not flow into it).
        """
        scales = sorted(batch.images, reverse=True)
        logits: dict[int, torch.Tensor] = {}
        teacher: torch.Tensor | None = None
        total = torch.zeros((), device=self.device)
        for scale in scales:
            with self._autocast():
                out = self.net(batch.images[scale])
                term = self.loss.scale_term(
                    out, batch.labels, teacher, num_scales=len(scales), is_teacher=teacher is None
                )
            if torch.isfinite(term):
                self.scaler.scale(term).backward()
            total = total + term.detach().float()
            logits[scale] = out.detach()
            if teacher is None:
                teacher = out.detach()
        _, components = self.loss(logits, batch.labels)
        return total, components, logits

    # ------------------------------------------------------------------ epochs
    def train_epoch(
        self,
        batches: Iterable[MultiScaleBatch],
        epoch: int,
        *,
        on_step: Callable[[StepEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> EpochRecord | None:
        """Train the rest of ``epoch``; None when ``should_stop`` interrupted it at a step boundary.

        A resumed trainer continues the partial epoch's meter, so the epoch's metrics cover every
        step whether or not the run was interrupted.
        """
        self.model.train()
        if self._meter is None or self._meter_epoch != epoch:
            self._meter, self._meter_epoch, self.step_in_epoch, self._epoch_seconds = ScaleMeter(), epoch, 0, 0.0
        meter = self._meter
        start = time.perf_counter()
        for batch in batches:
            self._step(batch, meter)
            self.step_in_epoch += 1
            if on_step is not None:
                on_step(StepEvent(epoch=epoch, step=self.step_in_epoch, global_step=self.global_step,
                                  batch_size=batch.batch_size))
            if should_stop is not None and should_stop():
                self._epoch_seconds += time.perf_counter() - start
                return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = self._epoch_seconds + time.perf_counter() - start
        self.epoch, self.step_in_epoch, self._meter = epoch + 1, 0, None
        return EpochRecord(
            epoch=epoch,
            scales=self.train_scales(epoch),
            train=meter.compute(),
            val={},
            train_loss_components=meter.mean_components(),
            images_per_second=meter.count / seconds if seconds > 0 else math.nan,
            seconds=seconds,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped_steps=meter.skipped,
        )

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[MultiScaleBatch], scales: Iterable[int] | None = None
    ) -> dict[int, dict[str, float]]:
        """Plain base loss and accuracy per scale; ``scales`` restricts which outputs are run."""
        self.net.eval()
        wanted = None if scales is None else set(scales)
        meter = ScaleMeter()
        for batch in batches:
            images = {s: x for s, x in batch.images.items() if wanted is None or s in wanted}
            if not images:
                raise ValueError(f"evaluation asked for scales {sorted(wanted)}, batch has {batch.scales}")
            with self._autocast():
                for scale, x in images.items():
                    out = self.net(x).float()
                    meter.update(
                        scale,
                        base_loss(out, batch.labels, task=self.task),
                        predict(out, task=self.task) == batch.labels,
                        batch.batch_size,
                    )
            meter.add_samples(batch.batch_size)
        return meter.compute()

    def _update_best(self, record: EpochRecord) -> None:
        metrics = record.val.get(self.selection_scale(record.epoch))
        if metrics is None:
            return
        # Higher accuracy wins; lower loss breaks ties (small validation sets tie often).
        score = (metrics["accuracy"], -metrics["loss"])
        if self.best_score is None or score > self.best_score:
            self.best_score = score
            self.best_epoch = record.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            record.is_best = True

    def fit(
        self,
        train_batches: Callable[[int], Iterable[MultiScaleBatch]],
        val_batches: Callable[[int], Iterable[MultiScaleBatch]] | None,
        *,
        on_epoch_end: Callable[[EpochRecord], None] | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> FitResult:
        """Train from ``self.epoch`` to ``options.epochs``; ``*_batches(epoch)`` yields that epoch.

        ``should_stop`` is polled after every step; when it turns true the run stops at that step
        boundary with ``interrupted=True`` (the caller checkpoints ``state_dict()`` and exits).
        """
        result = FitResult()
        for epoch in range(self.epoch, self.options.epochs):
            record = self.train_epoch(train_batches(epoch), epoch, on_step=on_step, should_stop=should_stop)
            if record is None:
                result.interrupted = True
                break
            if val_batches is not None:
                record.val = self.evaluate(val_batches(epoch), self.validation_scales(epoch))
                self._update_best(record)
            result.history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if should_stop is not None and should_stop() and self.epoch < self.options.epochs:
                result.interrupted = True
                break
        result.best_epoch = self.best_epoch
        result.best_val_accuracy = None if self.best_score is None else self.best_score[0]
        return result

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit, as plain dicts and tensors (weights_only-safe).

        The best weights are not in here (they live in their own file); only their score.
        """
        state: dict[str, Any] = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_score": None if self.best_score is None else list(self.best_score),
            "best_epoch": self.best_epoch,
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            "meter": None if self._meter is None else self._meter.state_dict(),
            "epoch_seconds": self._epoch_seconds,
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        # A disabled GradScaler saves {}, and loading {} into an enabled one raises: store it only
        # when it is in use, and let load_state_dict handle AMP being switched on or off.
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler.is_enabled():
            if "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            else:
                log.warning("checkpoint was saved without fp16 loss scaling; starting a fresh GradScaler")
        elif "scaler" in state:
            log.info("checkpoint has a GradScaler state; not needed without fp16, ignored")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_score = None if state["best_score"] is None else tuple(state["best_score"])
        self.best_epoch = state["best_epoch"]
        self._nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        meter = state.get("meter")
        self._meter = None if meter is None else ScaleMeter.from_state_dict(meter)
        self._meter_epoch = self.epoch if meter is not None else -1
        self._epoch_seconds = float(state.get("epoch_seconds", 0.0))

    def load_best(self) -> None:
        """Restore the weights of the best validation epoch (no-op when there was no validation)."""
        if self.best_state is not None:
            self.net.load_state_dict(self.best_state)


class ProgressiveMultiScaleTrainer(MultiScaleTrainer):
    """One scale per epoch from a growing schedule; validated at the current and the final scale."""

    mode = "progressive"

    def __init__(self, model: nn.Module, *, schedule: ScaleSchedule, **kwargs) -> None:
        if schedule.num_scales != 1:
            raise ValueError(
                f"a progressive schedule trains one scale per epoch, got {schedule.num_scales} per stage"
            )
        super().__init__(model, schedule=schedule, **kwargs)

    def validation_scales(self, epoch: int) -> tuple[int, ...]:
        return tuple(sorted(set(self.schedule.scales_at(epoch)) | set(self.schedule.final_scales)))

    def selection_scale(self, epoch: int) -> int:
        # The model is used at the final scale after training, so that is what selects it.
        return self.schedule.final_scales[-1]
