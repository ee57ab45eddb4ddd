"""Wiring of one training run: configuration in, run directory and results out.

The CLI parses flags into a :class:`TrainConfig` and calls :func:`run_training`; everything here is
plain library code (logging, no prints), so tests and notebooks can call it directly. The run builds
its objects (:mod:`~multiscale_dali.training.run_setup`, :mod:`~multiscale_dali.training.run_data`),
restores them through their own ``load_state_dict`` methods, and writes through
:class:`~multiscale_dali.training.run_files.RunFiles`.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from multiscale_dali.data.discovery import DataError, DatasetSplits
from multiscale_dali.models.input_size import check_train_batch
from multiscale_dali.training.accumulate import optimizer_steps_per_epoch
from multiscale_dali.training.best import all_finite
from multiscale_dali.training.checkpoint import CheckpointError, load_checkpoint
from multiscale_dali.training.config import (
    RESUME_MUTABLE_KEYS,
    ConfigError,
    TrainConfig,
    config_from_mapping,
    with_keys_before_they_existed,
)
from multiscale_dali.training.distributed import (
    DistributedContext,
    check_ranks_agree,
    distributed_session,
    quiet_unless_main,
)
from multiscale_dali.pipelines.factory import resolve_backend
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.losses import resolve_task
from multiscale_dali.training.recipe import EMA
from multiscale_dali.training.resume import (
    best_path,
    capture_rng_state,
    find_resume_checkpoint,
    restore_rng_state,
    run_dir_of,
)
from multiscale_dali.training.run_data import (
    RunLoaders,
    dataset_root,
    prepare_data,
    scan_cache_path,
    vet_splits,
)
from multiscale_dali.training.run_directory import check_fresh
from multiscale_dali.training.run_files import RunFiles
from multiscale_dali.training.run_lock import locked_run_directory
from multiscale_dali.training.run_setup import (
    build_lr_scheduler,
    build_network,
    build_optimizer,
    build_schedule,
    build_trainer,
    resolve_amp,
    seed_everything,
    warn_unvisited_scales,
)
from multiscale_dali.training.signals import StartupInterrupted, StopRequest
from multiscale_dali.training.split_record import split_record
from multiscale_dali.training.trainer import EpochRecord, FitResult, NonFiniteLossError, StepEvent
from multiscale_dali.training.wrapping import check_wrapping

# dataset_root, scan_cache_path, vet_splits and resolve_amp live in run_data and run_setup; the CLI,
# evaluation and the benchmark import them from here.
__all__ = [
    "ResumeWorldSizeError", "RunResult", "dataset_root", "resolve_amp", "run_training", "scan_cache_path",
    "vet_splits",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    out_dir: Path
    backend: str
    device: str
    task: str
    classes: tuple[str, ...]
    history: list[EpochRecord]
    best_epoch: int | None
    test: dict[int, dict[str, float]]
    dataset: dict
    interrupted: bool = False
    stop_signal: str | None = None
    requeue: bool = False  # stopped by the requeue signal: the job should run again (--resume auto)
    rank: int = 0  # this process's rank; only rank 0 wrote files (a CLI prints from rank 0 only)
    world_size: int = 1
    test_pending: bool = False  # a signal stopped the final test pass: --resume auto runs it


class ResumeWorldSizeError(CheckpointError):
    """A mid-epoch checkpoint of N processes resumed with another number of processes."""


# ---------------------------------------------------------------------------------------- resuming
def _same_data(current: str | None, saved: str | None, recorded: str | None) -> bool:
    """Whether ``--data`` names the checkpoint's dataset: ``./images`` and ``/abs/images`` do, and so
    does the absolute path the run recorded (its ``saved`` spelling may be relative to another cwd)."""
    if current is None or saved is None:
        return current == saved
    return os.path.realpath(current) in {os.path.realpath(p) for p in (saved, recorded) if p}


def _check_resume_config(config: TrainConfig, saved: dict[str, Any], path: Path, *,
                         recorded_data: str | None = None) -> None:
    """Settings that change what is trained must match the checkpoint's; errors name the flag."""
    current = config.with_resolved_scale_norm().to_dict()
    # Keys the checkpoint predates take the values it trained with; "" (a run of this version's first
    # days) is resolved the way that run resolved it.
    saved = with_keys_before_they_existed(saved)
    saved["scale_norm"] = config_from_mapping(saved, source=str(path)).with_resolved_scale_norm().scale_norm
    if _same_data(config.data, saved.get("data"), recorded_data):
        saved = saved | {"data": config.data}
    schedule_free_of_epochs = config.lr_schedule == "constant" and (config.mode == "multiscale" or config.schedule)
    if saved.get("epochs", config.epochs) != config.epochs and not schedule_free_of_epochs:
        raise ConfigError(
            "epochs", f"is {config.epochs} but the checkpoint {path} was trained for {saved['epochs']}: the "
            "cosine learning-rate curve and the progressive ramp are laid out over the epoch count, so it can "
            "change on resume only with --lr-schedule constant and a schedule that does not depend on it "
            "(multiscale, or an explicit --schedule)"
        )
    for key, value in saved.items():
        if key not in RESUME_MUTABLE_KEYS and key in current and current[key] != value:
            raise ConfigError(
                key, f"is {current[key]!r} but the checkpoint {path} was trained with {value!r}; "
                "resume with the same value or start a new --out"
            )


def _resume_keeps_loader_states(payload: dict[str, Any], path: Path, world_size: int) -> bool:
    """Whether each rank restores its saved loader position; raises when the resume cannot be exact.

    The loader positions belong to one sharding of the data. With the same number of processes each
    rank continues its own shard exactly. With another number, only an epoch boundary can be resumed:
    the next epoch starts fresh under the new sharding (its order seeded by ``(seed, epoch)``).
    """
    saved = int(payload.get("world_size", 1))
    if saved == world_size:
        return True
    trainer = payload["trainer"]
    if int(trainer["step_in_epoch"]) != 0:
        raise ResumeWorldSizeError(
            f"{path} was saved by {saved} process(es) in the middle of epoch {int(trainer['epoch']) + 1} "
            f"(step {trainer['step_in_epoch']}), and this run has {world_size}: mid-epoch positions belong to "
            f"the sharding of {saved} process(es). Resume with {saved} process(es) (torchrun --nproc-per-node ...), "
            "or from a checkpoint taken at an epoch end"
        )
    log.warning(
        "resuming a checkpoint of %d process(es) with %d: its loader positions are dropped and epoch %d starts "
        "fresh under the new sharding; the global batch is now %d x batch size, so consider the learning rate",
        saved, world_size, int(trainer["epoch"]) + 1, world_size,
    )
    return False


class _TestPassStopped(Exception):
    """A stop signal during the final test pass (every rank raises it at the same batch)."""


def _until_stopped(batches: Iterable[Any], should_stop: Callable[[], bool]) -> Iterator[Any]:
    for batch in batches:
        if should_stop():
            raise _TestPassStopped
        yield batch


# ---------------------------------------------------------------------------------------- the run
def run_training(
    config: TrainConfig,
    *,
    resume: str | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    requeue_signal: signal.Signals | None = None,
) -> RunResult:
    """Train, keep the best model on validation, evaluate it once on the test split.

    ``resume``: None for a fresh run (refused if ``config.out`` already holds one), ``"auto"`` to
    continue the run in ``config.out`` if it has a checkpoint, or a checkpoint path.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: each trains on its shard of the
    data with DDP, metrics are summed over the ranks, and only rank 0 writes files and calls
    ``on_epoch_end``/``on_step``. ``config.batch_size`` is per process.

    SIGTERM/SIGINT, and ``requeue_signal`` when given (``signals.resolve_requeue_signal``), stop every
    rank after the same step with a checkpoint (``RunResult.interrupted``; ``requeue`` for the latter).
    """
    with (distributed_session(config.device) as context, quiet_unless_main(context),
          locked_run_directory(config.out, context)):
        return _TrainingRun(config, context, resume=resume, on_epoch_end=on_epoch_end, on_step=on_step,
                            requeue_signal=requeue_signal).run()


class _TrainingRun:
    """One process's part of a run: build, restore, fit, test. Only rank 0 writes files."""

    def __init__(self, config: TrainConfig, context: DistributedContext, *, resume: str | None,
                 on_epoch_end: Callable[[EpochRecord], None] | None,
                 on_step: Callable[[StepEvent], None] | None,
                 requeue_signal: signal.Signals | None = None) -> None:
        self.config = config.with_resolved_scale_norm()
        self.requeue_signal = requeue_signal
        self.context = context
        self.device = context.device
        self.out_dir = Path(config.out)
        self.on_epoch_end = on_epoch_end
        self.on_step = on_step
        check_wrapping(config, context)
        self.found = self._find_checkpoint(resume)
        self._saved_at: tuple[int, int, int] | None = None
        self.loaders: RunLoaders | None = None

    # ------------------------------------------------------------------ set-up
    def _find_checkpoint(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        found = find_resume_checkpoint(resume, self.out_dir) if resume else None
        check_ranks_agree(self.context, "the checkpoint to resume from (epoch, step in epoch, global step)",
                          None if found is None else tuple(int(found[1]["trainer"][k])
                                                           for k in ("epoch", "step_in_epoch", "global_step")))
        if found is None:
            check_fresh(self.out_dir)
            return None
        path, payload = found
        if self.out_dir.resolve() != run_dir_of(path).resolve():
            # Continuing a run somewhere else starts a new run directory: never mix two runs' files.
            check_fresh(self.out_dir)
        _check_resume_config(self.config, payload["config"], path,
                             recorded_data=payload.get("resolved", {}).get("data"))
        log.info("resuming from %s (epoch %d, step %d)", path,
                 payload["trainer"]["epoch"] + 1, payload["trainer"]["step_in_epoch"])
        return found

    def _prepare_data(self) -> None:
        config, context = self.config, self.context
        self.backend = resolve_backend(config.backend)
        seed_everything(config.seed)
        root = dataset_root(config)
        self.splits, self.split_fingerprint = prepare_data(config, context, root)
        self.task = resolve_task(self.splits.num_classes, config.task)
        self.schedule = build_schedule(config)
        warn_unvisited_scales(config, self.schedule)
        self._warn_empty_splits()
        self._check_same_splits(root)
        resolved = {"data": str(root.resolve()), "backend": self.backend, "device": str(self.device),
                    "task": self.task, "world_size": context.world_size,
                    "global_batch_size": config.batch_size * context.world_size,
                    "split_fingerprint": self.split_fingerprint}
        self.files = RunFiles(self.out_dir, is_main=context.is_main, common={
            "config": config.to_dict(), "resolved": resolved, "classes": list(self.splits.classes),
            "task": self.task, "schedule": self.schedule.to_dict()})
        splits = self.splits
        log.info(
            "data %s: %d classes (%s), %s task; train/val/test = %d/%d/%d; backend %s on %s",
            root, splits.num_classes, ", ".join(splits.classes), self.task,
            len(splits.train), len(splits.val), len(splits.test), self.backend, self.device,
        )
        if context.is_distributed:
            log.info("%d processes, each with batch size %d: global batch %d; each split is sharded over the ranks",
                     context.world_size, config.batch_size, config.batch_size * context.world_size)

    def _warn_empty_splits(self) -> None:
        if not len(self.splits.val):
            log.warning("the validation split is empty: no epoch is chosen as best, the final weights become "
                        "best.pt (add images, or a larger val fraction in --split-fractions)")
        if not len(self.splits.test):
            log.warning("the test split is empty: results.json will hold no test metrics (add images, or a "
                        "larger test fraction in --split-fractions)")

    def _check_same_splits(self, root: Path) -> None:
        """A resumed run trains on the checkpoint's splits: a dataset that changed since would mix two."""
        if self.found is None:
            return
        path, payload = self.found
        recorded = payload.get("resolved", {}).get("split_fingerprint")
        if recorded is not None and recorded != self.split_fingerprint:
            raise DataError(f"{root} changed since {path} was saved (files added, removed or renamed), so its "
                            "splits differ from the ones the run trained on; restore the dataset, or train anew "
                            "into another --out")

    def _build(self) -> None:
        config = self.config
        if self.device.type == "cuda":
            # A run sees a small fixed set of input shapes (one per scale), so cuDNN's per-shape
            # autotuning pays for itself after the first steps (as in timm and the DALI examples).
            torch.backends.cudnn.benchmark = True
        model = build_network(config, task=self.task, num_classes=self.splits.num_classes, device=self.device)
        self.optimizer = build_optimizer(config, model.parameters())
        self.loaders = RunLoaders(config=config, context=self.context, backend=self.backend, splits=self.splits,
                                  schedule=self.schedule)
        # A shard smaller than the batch trains on one batch of the shard's size: perhaps of one sample.
        check_train_batch(config.model, self.schedule.all_scales, num_outputs=1,
                          batch_size=min(config.batch_size, self.loaders.train.spec.shard_size))
        # Shards are padded to one size, so every rank runs the same steps per epoch; a rank with
        # fewer would leave the others waiting in a collective until the timeout.
        check_ranks_agree(self.context, "the batches per epoch (train, val)",
                          (len(self.loaders.train), None if self.loaders.val is None else len(self.loaders.val)))
        self.trainer = build_trainer(config, model, task=self.task, schedule=self.schedule, optimizer=self.optimizer,
                                     steps_per_epoch=len(self.loaders.train), context=self.context,
                                     num_classes=self.splits.num_classes)

    def _restore(self, path: Path, payload: dict[str, Any]) -> None:
        trainer, context = self.trainer, self.context
        keep_loader_states = _resume_keeps_loader_states(payload, path, context.world_size)
        trainer.load_state_dict(payload["trainer"])
        # Checkpoints of one process before sharding existed hold a single "loader" and "rng".
        loader_states = payload.get("loaders") or [payload["loader"]]
        rng_states = payload.get("rngs") or [payload["rng"]]
        if keep_loader_states:
            try:
                self.loaders.train.load_state_dict(loader_states[context.rank])
            except ValueError as err:
                raise CheckpointError(f"{path} cannot continue this run's data pipeline: {err}") from None
            restore_rng_state(rng_states[context.rank])
        else:
            restore_rng_state(rng_states[0])
            # The schedule counts steps, and an epoch now has another number of them: continue at
            # the step this epoch boundary has under the new sharding.
            steps_per_epoch = optimizer_steps_per_epoch(len(self.loaders.train), self.config.accum_steps)
            start = trainer.epoch * steps_per_epoch
            trainer.renumber_steps(start, lr_scheduler=build_lr_scheduler(self.config, self.optimizer,
                                                                          steps_per_epoch, start_step=start))
        self._restore_best(run_dir_of(path))
        self.files.keep_metrics_before(trainer.epoch)
        self._saved_at = self._position()

    def _restore_best(self, source_dir: Path) -> None:
        """The best weights so far, from the run the checkpoint belongs to.

        They must be the epoch the checkpoint records as best: resuming an older checkpoint (the
        previous one, after a damaged last) can find a best.pt written later. Then the trainer drops
        the record and the next validated epoch starts the search again.
        """
        trainer = self.trainer
        source = best_path(source_dir)
        recorded = trainer.best_epoch
        if recorded is None or not source.exists():
            return
        best = load_checkpoint(source)
        if not trainer.adopt_best_weights(best["model"], epoch=best.get("epoch")):
            log.warning("%s holds epoch %s but the checkpoint's best is epoch %s: the best model is chosen "
                        "again from the epochs trained from here", source, best.get("epoch"), recorded)
            return
        if source_dir.resolve() != self.out_dir.resolve():
            # A run continued in a new directory carries its best model along.
            self.files.carry_best(best)

    # ------------------------------------------------------------------ checkpoints
    def _position(self) -> tuple[int, int, int]:
        return self.trainer.epoch, self.trainer.step_in_epoch, self.trainer.global_step

    def _save_training_state(self) -> None:
        """A collective: every rank contributes its loader position and RNG state, rank 0 writes.

        Saving twice at one position (an interrupt right after an epoch-end save) is skipped, so
        ``previous.pt`` stays a genuinely older checkpoint to fall back on.
        """
        if self._saved_at == self._position():
            return
        trainer_state = self.trainer.state_dict()
        ranks = self.context.all_gather_object({"loader": self.loaders.train.state_dict(),
                                                "rng": capture_rng_state(), "global_step": self.trainer.global_step})
        self.files.save_training_state(trainer_state, ranks)
        self._saved_at = self._position()

    # ------------------------------------------------------------------ callbacks
    def _step_done(self, event: StepEvent) -> None:
        if self.config.checkpoint_every and event.global_step % self.config.checkpoint_every == 0:
            self._save_training_state()
        if self.on_step is not None and self.context.is_main:
            self.on_step(event)

    def _epoch_done(self, record: EpochRecord) -> None:
        self.files.append_epoch(record, mode=self.config.mode, backend=self.backend)
        if record.is_best:
            self.files.save_best(self.trainer.selected_net, epoch=record.epoch,
                                 val=record.val_ema if self.trainer.recipe.selected == EMA else record.val)
        self._save_training_state()
        if self.on_epoch_end is not None and self.context.is_main:
            self.on_epoch_end(record)

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        # Installed for the whole run: a signal during start-up stops at once (nothing to save yet),
        # one during training at the next step boundary with a checkpoint, one during the test pass
        # at the next batch, with results.json saying the test pass is still to do.
        with StopRequest(requeue_signal=self.requeue_signal, immediate=not self.context.is_distributed) as stop:
            self._prepare_data()
            try:
                self._build()
                if self.found is not None:
                    self._restore(*self.found)
                self._stop_if_requested(stop)
                self.files.write_config(dataset=self.splits.summary())
                if isinstance(self.splits, DatasetSplits):  # a pack's splits are its manifest's
                    self.files.write_splits(split_record(self.splits, fingerprint=self.split_fingerprint))
                stop.immediate = False
                val_epoch = None if self.loaders.val is None else self.loaders.val.epoch
                # The flag is combined over the ranks at every step boundary (torchrun forwards SIGTERM
                # to every worker, but not at the same instant), so all ranks stop after the same step.
                fit = self.trainer.fit(self.loaders.train.epoch, val_epoch, on_epoch_end=self._epoch_done,
                                       on_step=self._step_done,
                                       should_stop=lambda: self.context.any_rank(stop.requested))
                if fit.interrupted:
                    return self._interrupted(fit, stop.signal_name)
                test = self._test(stop)
            finally:
                if self.loaders is not None:  # None when building them failed
                    self.loaders.close()
        if test is None:
            return self._result(fit, test={}, interrupted=True, stop_signal=self._agreed_signal(stop.signal_name),
                                test_pending=True)
        return self._result(fit, test=test)

    def _agreed_signal(self, own_signal: str | None) -> str | None:
        """The signal any rank received (a collective)."""
        return next((n for n in self.context.all_gather_object(own_signal) if n), None)

    def _stop_if_requested(self, stop: StopRequest) -> None:
        """Under torchrun the start-up is not stopped from the handler (the other ranks would wait in a
        collective): the ranks agree here, before the first step, and stop together."""
        if self.context.any_rank(stop.requested):
            raise StartupInterrupted(self._agreed_signal(stop.signal_name) or "a signal")

    def _interrupted(self, fit: FitResult, own_signal: str | None) -> RunResult:
        self._save_training_state()
        signal_name = self._agreed_signal(own_signal)
        trainer = self.trainer
        log.warning("rank %d/%d stopped by %s at epoch %d step %d (global step %d)%s",
                    self.context.rank, self.context.world_size, signal_name, trainer.epoch + 1,
                    trainer.step_in_epoch, trainer.global_step,
                    "; checkpoint saved, continue with --resume auto" if self.context.is_main else "")
        # Nobody exits before rank 0's checkpoint is on disk.
        self.context.barrier()
        requeue = self.requeue_signal is not None and signal_name == self.requeue_signal.name
        return self._result(fit, test={}, interrupted=True, stop_signal=signal_name, requeue=requeue)

    def _test(self, stop: StopRequest) -> dict[int, dict[str, float]] | None:
        """The best model, once, on the test split; results.json. None when a signal stopped the pass."""
        trainer, schedule = self.trainer, self.schedule
        if not trainer.load_best():  # no validation split: the final weights (or their EMA) are the model
            trainer.net.load_state_dict(trainer.selected_net.state_dict())
            if not all_finite(trainer.net):
                # Never hand on a NaN model as the result of a run (validation never picked one either).
                raise NonFiniteLossError(
                    "training diverged: the model's weights are NaN or infinite and no validated epoch had a "
                    "finite loss, so there is no model to keep; lower --lr or --weight-decay, or set --grad-clip")
            self.files.save_best(trainer.net, epoch=self.config.epochs - 1)
        test_scales = schedule.final_scales if self.config.mode == "multiscale" else schedule.all_scales
        metrics: dict[int, dict[str, float]] | None = {}
        if len(self.splits.test):
            loader = self.loaders.test(constant_schedule(test_scales))
            try:
                stopped = lambda: self.context.any_rank(stop.requested)  # noqa: E731
                metrics = trainer.evaluate(_until_stopped(loader.epoch(0), stopped))
            except _TestPassStopped:
                metrics = None
            finally:
                loader.close()
        self.files.write_results({
            "best_epoch": trainer.best_epoch,
            "best_val_accuracy": None if trainer.best_score is None else trainer.best_score[0],
            "test": {str(s): m for s, m in (metrics or {}).items()}, "backend": self.backend,
            "device": str(self.device), "task": self.task, "classes": list(self.splits.classes),
            "world_size": self.context.world_size,
            # False: a signal stopped the test pass; `--resume auto` runs it (training is done).
            "test_complete": metrics is not None})
        self.context.barrier()
        return metrics

    def _result(self, fit: FitResult, *, test: dict, interrupted: bool = False,
                stop_signal: str | None = None, requeue: bool = False, test_pending: bool = False) -> RunResult:
        return RunResult(
            out_dir=self.out_dir, backend=self.backend, device=str(self.device), task=self.task,
            classes=self.splits.classes, history=fit.history, best_epoch=self.trainer.best_epoch, test=test,
            dataset=self.splits.summary(), interrupted=interrupted, stop_signal=stop_signal,
            requeue=requeue, rank=self.context.rank, world_size=self.context.world_size, test_pending=test_pending,
        )
