"""Trainers that take :class:`MultiScaleBatch` tensors already on the device.

``MultiScaleTrainer`` runs every scale of the schedule each step (base loss averaged over scales
plus the scale-consistency term); ``ProgressiveMultiScaleTrainer`` is the same engine fed a schedule
of one growing scale, validated at the current and at the final scale. Neither knows which backend
produced the batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import ScaleSchedule
from multiscale_dali.training.accumulate import MicroBatch, PendingStep, micro_batches, rescale_gradients
from multiscale_dali.training.backward import StepBackward
from multiscale_dali.training.best import BestEpoch
from multiscale_dali.training.checkpoint import load_scaler_state
from multiscale_dali.training.compiled import no_shape_budget, shape_budget
from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.losses import LossValues, ScaleConsistencyLoss, base_loss, predict
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.training.recipe import EMA, RAW, PreparedBatch, StepRecipe
from multiscale_dali.training.micro_batch import checkpoint_largest, micro_batch_largest
from multiscale_dali.training.segments import restore_buffers, snapshot_buffers
from multiscale_dali.training.wrapping import MultiScaleModel, training_modules
# The records are part of the trainer's interface: reporting and the CLI import them from here.
from multiscale_dali.training.records import EpochRecord, FitResult, StepEvent

__all__ = [
    "EpochRecord", "FitResult", "MultiScaleModel", "MultiScaleTrainer", "NonFiniteLossError",
    "ProgressiveMultiScaleTrainer", "StepEvent", "TrainerOptions",
]

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError, exit_code=EXIT_FAILURE):
    """Raised after too many consecutive steps with a NaN/inf loss: not the input's fault, yet the
    user's to fix (the message says how: learning rate, AMP), so the CLI shows it as one line."""


@dataclass(frozen=True)
class TrainerOptions:
    epochs: int
    amp_dtype: torch.dtype | None = None  # None: full precision
    grad_clip_norm: float | None = None
    memory_efficient: bool = False
    max_consecutive_nonfinite: int = 5
    micro_batch_batchnorm: bool = False  # memory_efficient: chunk the largest scale of a BatchNorm model too
    accum_steps: int = 1  # micro-batches (loader batches) per optimiser step
    compile_backend: str | None = None  # torch.compile backend of the training step; None: eager
    sync_batchnorm: bool = False  # distributed runs: SyncBatchNorm over the ranks

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
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")


class MultiScaleTrainer:
    """All scales of ``schedule.scales_at(epoch)`` every step; validation on every scale."""

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
        distributed: DistributedContext | None = None,
        recipe: StepRecipe | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.distributed = distributed or DistributedContext(device=self.device)
        # The bare network (what checkpoints and evaluation use) and the module a step calls.
        self.net, self.model = training_modules(model, distributed=self.distributed, device=self.device,
                                                compile_backend=options.compile_backend,
                                                sync_bn=options.sync_batchnorm)
        self.loss = loss
        self.task = loss.task
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.schedule = schedule
        self.options = options
        self.recipe = recipe or StepRecipe()  # erasing, MixUp/CutMix, label smoothing, weight EMA
        # GradScaler only for float16: bfloat16 has float32's exponent range and needs no scaling.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=options.amp_dtype == torch.float16
        )
        num_scales = len(schedule.all_scales)
        micro_batched = micro_batch_largest(self.net, memory_efficient=options.memory_efficient,
                                            batchnorm_opt_in=options.micro_batch_batchnorm)
        checkpointed = checkpoint_largest(self.net, memory_efficient=options.memory_efficient,
                                          micro_batched=micro_batched, compiled=options.compile_backend is not None)
        self._backward = StepBackward(
            self.model, loss=loss, scaler=self.scaler, device=self.device, amp_dtype=options.amp_dtype,
            memory_efficient=options.memory_efficient, micro_batch_largest=micro_batched,
            checkpoint_net=self.net if checkpointed else None,
            shape_budget=(lambda: shape_budget(num_scales)) if options.compile_backend else no_shape_budget)
        self.epoch = 0
        self.global_step = 0
        self._best = BestEpoch()
        self._nonfinite_in_a_row = 0
        # BatchNorm running statistics and counters, snapshotted before each step (see _step).
        self._buffers = list(self.net.buffers())
        # Position inside the current epoch: a checkpoint taken mid-epoch resumes exactly here.
        self.step_in_epoch = 0
        self._meter: ScaleMeter | None = None
        self._meter_epoch = -1
        self._epoch_seconds = 0.0
        self._last_loss: torch.Tensor | None = None  # the latest step's total, for StepEvent
        self._last_images = 0  # the latest step's samples, for StepEvent
        # The optimiser step being accumulated; None between steps (checkpoints are taken only then).
        self._pending: PendingStep | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def train_scales(self, epoch: int) -> tuple[int, ...]:
        return self.schedule.scales_at(epoch)

    def validation_scales(self, epoch: int) -> tuple[int, ...]:
        return self.schedule.scales_at(epoch)

    def selection_scale(self, epoch: int) -> int:
        """The scale whose validation accuracy picks the best model."""
        return max(self.validation_scales(epoch))

    # ------------------------------------------------------------------ one step
    def _step(self, batch: MultiScaleBatch, meter: ScaleMeter, micro: MicroBatch | None = None) -> bool | None:
        """One micro-batch of an optimisation step, then the step itself after the group's last one.

        None while the step is still accumulating; else whether it was taken (False: skipped for a
        non-finite loss). Without ``micro`` the batch is a whole step.
        """
        micro = micro or MicroBatch(batch)
        if micro.index == 0:
            self.optimizer.zero_grad(set_to_none=True)
            # The train-mode forward updates BatchNorm running statistics before the loss is known to be
            # finite; a skipped step must not leave inf/NaN in them (they would poison every later eval).
            self._pending = PendingStep(saved_buffers=snapshot_buffers(self._buffers), meter=ScaleMeter())
        pending = self._pending
        prepared = self.recipe.prepare(batch)
        losses, logits = self._backward(prepared, loss_scale=1.0 / self.options.accum_steps, sync=micro.closes_group)
        # The micro-batch's one device->host transfer: every logged number and the finiteness check. It
        # comes after the backward, so the device runs forward and backward without waiting for the
        # host; a non-finite step's gradients are dropped below.
        values = losses.read()
        finite = math.isfinite(values.total)
        pending.add(total=losses.total.detach(), finite=finite, images=batch.batch_size)
        if finite:
            self._record_step(prepared, logits, values, pending.meter)
        if not micro.closes_group:
            return None
        self._pending, self._last_loss, self._last_images = None, pending.mean_loss(), pending.images
        # Under DDP every rank ran its backward (it all-reduces and waits for every rank); the ranks
        # then agree to skip a step that was non-finite on any of them.
        if self.distributed.any_rank(not pending.finite):
            self._skip_step(pending.saved_buffers, meter, here=not pending.finite)
            return False
        self._nonfinite_in_a_row = 0
        if micro.group_size < self.options.accum_steps:
            # The epoch's shortened last group: its losses were scaled by 1/K, its mean needs 1/m.
            rescale_gradients(self.net.parameters(), self.options.accum_steps / micro.group_size)
        self._optimizer_step()
        self.recipe.after_step(self.net)
        meter.add_meter(pending.meter)
        return True

    def _skip_step(self, saved_buffers: list[torch.Tensor], meter: ScaleMeter, *, here: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        restore_buffers(self._buffers, saved_buffers)
        self._nonfinite_in_a_row += 1
        meter.add_skipped_step()
        log.warning("non-finite loss at step %d%s: step skipped", self.global_step, "" if here else " on another rank")
        if self._nonfinite_in_a_row >= self.options.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} consecutive steps had a non-finite loss "
                f"(last at global step {self.global_step}); stopping. Lower the learning rate, "
                "enable --grad-clip, or try --amp off."
            )

    def _optimizer_step(self) -> None:
        if self.options.grad_clip_norm is not None:
            # Clip the true gradients: unscale first, or the threshold applies to scaled values.
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.options.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1

    def _record_step(self, prepared: PreparedBatch, logits: Mapping[int, torch.Tensor], values: LossValues,
                     meter: ScaleMeter) -> None:
        count = 0
        for scale, out in logits.items():
            # The loss already computed each scale's base loss; only accuracy is new work.
            loss_mean, hits, count = self._metric_terms(out, prepared.batch, values.base[scale],
                                                        labels=prepared.labels_at(scale),
                                                        targets=prepared.target_at(scale))
            meter.update(scale, loss_mean, hits, count)
        meter.add_samples(count)
        # Components are batch means over every sample, padding included (as the gradient is).
        meter.add_components(values.as_components(), count)

    def _metric_terms(
        self, logits: torch.Tensor, batch: MultiScaleBatch, loss_mean: torch.Tensor | float | None = None, *,
        labels: torch.Tensor | None = None, targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | float, torch.Tensor, int]:
        """``(mean base loss, per-sample hits, sample count)`` over the batch's real samples.

        Padded duplicates (``batch.valid`` False) are left out, so once the ranks' sums are added up
        every sample counts exactly once. ``loss_mean``: the whole batch's, reused when nothing is left out.
        ``labels`` (hits) and ``targets`` (loss) default to ``batch.labels`` (see recipe.PreparedBatch).
        """
        logits, labels = logits.detach(), batch.labels if labels is None else labels
        targets = labels if targets is None else targets
        if batch.valid is not None:
            logits, labels, targets, loss_mean = logits[batch.valid], labels[batch.valid], targets[batch.valid], None
        count = int(labels.shape[0])
        if count == 0:
            # A batch of padding only: still recorded, so every rank's meter knows every scale.
            return 0.0, labels.new_zeros(0, dtype=torch.bool), 0
        if loss_mean is None:
            loss_mean = base_loss(logits, targets, task=self.task)
        return loss_mean, predict(logits, task=self.task) == labels, count

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
        accum = self.options.accum_steps
        for micro in micro_batches(batches, accum_steps=accum, start=self.step_in_epoch):
            taken = self._step(micro.batch, meter, micro)
            self.step_in_epoch += 1
            if taken is None:
                continue  # mid-step: no event, and no stop (a checkpoint never holds half a step's gradients)
            if on_step is not None:
                on_step(StepEvent(epoch=epoch, step=-(-self.step_in_epoch // accum), global_step=self.global_step,
                                  batch_size=self._last_images, loss=self._last_loss))
            if should_stop is not None and should_stop():
                self._epoch_seconds += time.perf_counter() - start
                return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # Summed over the ranks (every rank calls this at the same step); timed after the reduction,
        # so images/s is the whole run's: all ranks' samples over the slowest rank's time.
        totals = meter.reduced(self.distributed)
        seconds = self._epoch_seconds + time.perf_counter() - start
        self.epoch, self.step_in_epoch, self._meter = epoch + 1, 0, None
        return EpochRecord(
            epoch=epoch,
            scales=self.train_scales(epoch),
            train=totals.compute(),
            val={},
            train_loss_components=totals.mean_components(),
            images_per_second=totals.count / seconds if seconds > 0 else math.nan,
            seconds=seconds,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped_steps=meter.skipped,
        )

    def evaluate(
        self, batches: Iterable[MultiScaleBatch], scales: Iterable[int] | None = None
    ) -> dict[int, dict[str, float]]:
        """Plain base loss and accuracy per scale; ``scales`` restricts which outputs are run.

        Distributed: every rank evaluates its shard with rank 0's BatchNorm statistics, padded
        duplicates are left out, and the sums are added over the ranks (a collective: every rank
        calls it), so the result equals a single process evaluating the whole split.
        """
        return self._evaluate_models(batches, scales, {RAW: self.net})[RAW]

    @torch.no_grad()
    def _evaluate_models(self, batches: Iterable[MultiScaleBatch], scales: Iterable[int] | None,
                         nets: Mapping[str, nn.Module]) -> dict[str, dict[int, dict[str, float]]]:
        """:meth:`evaluate` of several models (the raw weights, their EMA) in one pass over the batches."""
        for net in nets.values():
            net.eval()
            self.distributed.broadcast_buffers(net)
        wanted = None if scales is None else set(scales)
        meters = {name: ScaleMeter() for name in nets}
        for batch in batches:
            images = {s: x for s, x in batch.images.items() if wanted is None or s in wanted}
            if not images:
                raise ValueError(f"evaluation asked for scales {sorted(wanted)}, batch has {batch.scales}")
            for name, net in nets.items():
                count = 0
                with self._backward.autocast():
                    for scale, x in images.items():
                        loss_mean, hits, count = self._metric_terms(net(x).float(), batch)
                        meters[name].update(scale, loss_mean, hits, count)
                meters[name].add_samples(count)
        return {name: meter.reduced(self.distributed).compute() for name, meter in meters.items()}

    def _validated(self, record: EpochRecord, batches: Iterable[MultiScaleBatch]) -> EpochRecord:
        """``record`` with its validation metrics (and the EMA's), and whether its epoch is the best so far."""
        nets = self.recipe.models(self.net)
        val = self._evaluate_models(batches, self.validation_scales(record.epoch), nets)
        metrics = val[self.recipe.selected].get(self.selection_scale(record.epoch))
        is_best = metrics is not None and self._best.offer(record.epoch, metrics, nets[self.recipe.selected])
        return dataclasses.replace(record, val=val[RAW], val_ema=val.get(EMA, {}), is_best=is_best)

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
                record = self._validated(record, val_batches(epoch))
            result.history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if should_stop is not None and should_stop() and self.epoch < self.options.epochs:
                result.interrupted = True
                break
        result.best_epoch = self._best.epoch
        return result

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit, as plain dicts and tensors (weights_only-safe).

        The best weights are not in here (they live in their own file); only their score.
        Distributed: a collective (the partial epoch's metrics are summed over the ranks), so every
        rank calls it at the same step.
        """
        if self._pending is not None:
            raise RuntimeError("a training state is taken between optimiser steps, not while one accumulates")
        best = self._best.state_dict()
        state: dict[str, Any] = {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_score": best["best_score"],
            "best_epoch": best["best_epoch"],
            "nonfinite_in_a_row": self._nonfinite_in_a_row,
            # Distributed: the partial epoch's sums over every rank (a collective), which rank 0 saves.
            "meter": None if self._meter is None else self._meter.reduced(self.distributed).state_dict(),
            "epoch_seconds": self._epoch_seconds,
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        state.update(self.recipe.state_dict(self.distributed))  # the EMA and erase/mix generators, when on
        # A disabled GradScaler saves {}, and loading {} into an enabled one raises: store it only
        # when it is in use, and let load_state_dict handle AMP being switched on or off.
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; the best weights come back through :meth:`adopt_best_weights`."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        load_scaler_state(self.scaler, state.get("scaler"))
        self.recipe.load_state_dict(state, rank=self.distributed.rank)
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self._best.load_state_dict(state)
        self._nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        meter = state.get("meter")
        self._meter = None if meter is None else ScaleMeter.from_state_dict(meter)
        if self._meter is not None and not self.distributed.is_main:
            # The saved sums already cover every rank; rank 0 carries them on, the others restart from
            # zero, so the next reduction adds each sample once.
            self._meter = ScaleMeter(skipped=self._meter.skipped)
        self._meter_epoch = self.epoch if meter is not None else -1
        self._epoch_seconds = float(state.get("epoch_seconds", 0.0))

    def renumber_steps(
        self, global_step: int, *, lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    ) -> None:
        """Continue an epoch boundary whose step count changed (a resume with another number of processes).

        ``global_step`` is where this boundary falls under the new sharding, and ``lr_scheduler`` the
        schedule rebuilt at that step: the restored one counted the steps of the old sharding.
        """
        if self.step_in_epoch != 0:
            raise ValueError(f"steps can be renumbered at an epoch boundary only, not at step {self.step_in_epoch} "
                             f"of epoch {self.epoch + 1}")
        self.global_step = global_step
        self.lr_scheduler = lr_scheduler

    # ------------------------------------------------------------------ the best epoch
    @property
    def best_epoch(self) -> int | None:
        return self._best.epoch

    @property
    def best_score(self) -> tuple[float, float] | None:
        """``(accuracy, -loss)`` at the selection scale of the best epoch; None before any validation."""
        return self._best.score

    def adopt_best_weights(self, weights: Mapping[str, torch.Tensor], *, epoch: int | None) -> bool:
        """Take the saved weights of the best epoch (``best.pt``) after :meth:`load_state_dict`.

        False, and the best-epoch record dropped, when they belong to another epoch than the one the
        restored state records as best (see :meth:`BestEpoch.adopt`).
        """
        return self._best.adopt(weights, epoch=epoch)

    def load_best(self) -> bool:
        """Restore the weights of the best validation epoch; False (weights unchanged) when there are none."""
        if self._best.weights is None:
            return False
        self.net.load_state_dict(self._best.weights)
        return True

    @property
    def selected_net(self) -> nn.Module:
        """The weights model selection keeps: the EMA's with ``select_on`` ema, else the trained ones."""
        return self.recipe.models(self.net)[self.recipe.selected]


class ProgressiveMultiScaleTrainer(MultiScaleTrainer):
    """One scale per epoch from a growing schedule; validated at the current and the final scale."""

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
