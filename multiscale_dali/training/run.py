"""Wiring of one training run: configuration in, run directory and results out.

The CLI parses flags into a :class:`TrainConfig` and calls :func:`run_training`; everything here is
plain library code (logging, no prints), so tests and notebooks can call it directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from multiscale_dali.training.checkpoint import CheckpointError, load_checkpoint
from multiscale_dali.fileio import atomic_save
from multiscale_dali.training.config import RESUME_MUTABLE_KEYS, ConfigError, TrainConfig
from multiscale_dali.constants import CONFIG_FILE, METRICS_FILE, RESULTS_FILE, SPLIT_NAMES
from multiscale_dali.data.discovery import DataError, DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.training.distributed import (
    DistributedContext,
    DistributedError,
    distributed_session,
    quiet_unless_main,
)
from multiscale_dali.pipelines.spec import Loader, LoaderSpec
from multiscale_dali.pipelines.factory import build_loader, resolve_backend
from multiscale_dali.training.losses import ScaleConsistencyLoss, num_outputs, resolve_task
from multiscale_dali.models.registry import build_model
from multiscale_dali.training.resume import (
    best_path,
    capture_rng_state,
    find_resume_checkpoint,
    restore_rng_state,
    run_dir_of,
    save_last,
)
from multiscale_dali.training.run_directory import (
    append_json_line,
    check_fresh,
    keep_metrics_before,
    write_json,
)
from multiscale_dali.pipelines.schedule import (
    ScaleSchedule,
    constant_schedule,
    linear_ramp_schedule,
    parse_steps,
    stepwise_schedule,
)
from multiscale_dali.training.signals import StopRequest
from multiscale_dali.training.trainer import (
    EpochRecord,
    FitResult,
    MultiScaleTrainer,
    ProgressiveMultiScaleTrainer,
    StepEvent,
    TrainerOptions,
)

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
    rank: int = 0  # this process's rank; only rank 0 wrote files (a CLI prints from rank 0 only)
    world_size: int = 1


class ResumeWorldSizeError(CheckpointError):
    """A mid-epoch checkpoint of N processes resumed with another number of processes."""


# ---------------------------------------------------------------------------------------- pieces
def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, off on CPU (slow there)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def build_schedule(config: TrainConfig) -> ScaleSchedule:
    if config.mode == "multiscale":
        return constant_schedule(config.scales)
    try:
        if config.schedule:
            return stepwise_schedule(parse_steps(config.schedule))
        # Two scales: a ramp snapped to --ramp-multiple; more: the listed scales are the ramp's steps.
        return linear_ramp_schedule(
            min_scale=config.scales[0], max_scale=config.scales[-1], epochs=config.epochs,
            multiple=config.ramp_multiple, levels=config.scales if len(config.scales) > 2 else None,
        )
    except ValueError as err:
        raise ConfigError("schedule", str(err)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_root(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    from multiscale_dali.data.embedded import default_dataset

    return default_dataset(binary=config.default_dataset == "textures-binary")


def scan_cache_path(root: Path) -> Path:
    """One scan manifest per dataset root, shared by every run over it."""
    from multiscale_dali.data.embedded import default_cache_dir

    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return default_cache_dir() / "scan" / f"{digest}.json"


def vet_splits(splits: DatasetSplits, config: TrainConfig) -> DatasetSplits:
    """Pre-flight scan of every file: DALI cannot skip a bad file mid-run, so find them first.

    ``on_bad_file="error"`` raises :class:`~multiscale_dali.data.scan.BadImagesError` naming each bad
    file; ``"skip"`` trains on the good files, every label unchanged.
    """
    from multiscale_dali.data.scan import filter_good, scan_files

    if not config.scan:
        log.warning("--no-scan: the files are not checked; a bad image stops the run when a loader meets it")
        return splits
    every_file = [f for name in SPLIT_NAMES for f in splits.split(name).files]
    # One decode per file, and PIL releases the GIL while decoding: as many threads as loader workers.
    result = scan_files(every_file, max_pixels=config.max_image_pixels, workers=max(1, config.workers),
                        cache_path=scan_cache_path(Path(splits.root)))
    log.info("scanned %d files (%d from the cache): %d bad, %d converted", len(result.reports),
             result.cached_count, len(result.bad), len(result.converted))
    if result.ok:
        return splits
    if config.on_bad_file == "error":
        result.raise_for_bad()
    log.warning("--on-bad-file skip: training without %d bad file(s):\n%s", len(result.bad), result.describe_bad())
    kept = {}
    for name in SPLIT_NAMES:
        files, labels = filter_good(splits.split(name).files, splits.split(name).labels, result)
        kept[name] = SplitFiles(files=files, labels=labels)
    if not kept["train"].files:
        raise DataError(f"no readable training images left in {splits.root} after skipping bad files")
    return dataclasses.replace(splits, **kept)


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int, *, start_step: int = 0):
    """Per-step linear warm-up then cosine (or constant); a pure function of the step count.

    ``start_step`` > 0 rebuilds the schedule at that step of a resumed run (the optimizer's groups
    then carry ``initial_lr`` from the original scheduler).
    """
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def _check_resume_config(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Settings that change what is trained must match the checkpoint's; errors name the flag."""
    current = config.to_dict()
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


def _check_ranks_agree(context: DistributedContext, what: str, value: Any) -> None:
    """Every rank must hold the same ``value`` (plain data); a collective, cheap, run at start-up.

    Ranks that disagree about the data or the checkpoint would shard different lists or resume from
    different places and train on silently wrong data; fail before the first step instead.
    """
    values = context.all_gather_object(value)
    if any(v != values[0] for v in values[1:]):
        raise DistributedError(
            f"the {context.world_size} ranks disagree about {what}: "
            + "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            + ". Every node must see the same --data and --out (a shared filesystem) and the same flags."
        )


def _splits_fingerprint(splits: DatasetSplits) -> str:
    # Paths relative to the root: nodes may mount the same shared dataset at different places.
    digest = hashlib.sha256()
    for name in SPLIT_NAMES:
        split = splits.split(name)
        files = [os.path.relpath(f, splits.root) for f in split.files]
        digest.update(json.dumps([name, files, [int(v) for v in split.labels]]).encode())
    return digest.hexdigest()


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


class RunLoaders:
    """The train/val/test loaders of one run, closed together."""

    def __init__(self, *, backend: str, make_spec: Callable[[SplitFiles, ScaleSchedule, bool], LoaderSpec],
                 splits: DatasetSplits, train_schedule: ScaleSchedule, eval_schedule: ScaleSchedule) -> None:
        self.backend = backend
        self._make_spec = make_spec
        self._splits = splits
        self.train = build_loader(make_spec(splits.train, train_schedule, True), backend=backend)
        self.val = (
            build_loader(make_spec(splits.val, eval_schedule, False), backend=backend) if len(splits.val) else None
        )

    def test(self, schedule: ScaleSchedule) -> Loader:
        return build_loader(self._make_spec(self._splits.test, schedule, False), backend=self.backend)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()


# ---------------------------------------------------------------------------------------- the run
def run_training(
    config: TrainConfig,
    *,
    resume: str | None = None,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> RunResult:
    """Train, keep the best model on validation, evaluate it once on the test split.

    ``resume``: None for a fresh run (refused if ``config.out`` already holds one), ``"auto"`` to
    continue the run in ``config.out`` if it has a checkpoint, or a checkpoint path.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: each trains on its shard of the
    data with DDP, metrics are summed over the ranks, and only rank 0 writes files and calls
    ``on_epoch_end``/``on_step``. ``config.batch_size`` is per process.
    """
    with distributed_session(config.device) as context, quiet_unless_main(context):
        return _TrainingRun(config, context, resume=resume, on_epoch_end=on_epoch_end, on_step=on_step).run()


class _TrainingRun:
    """One process's part of a run: build, restore, fit, test. Only rank 0 writes files."""

    def __init__(self, config: TrainConfig, context: DistributedContext, *, resume: str | None,
                 on_epoch_end: Callable[[EpochRecord], None] | None,
                 on_step: Callable[[StepEvent], None] | None) -> None:
        self.config = config
        self.context = context
        self.out_dir = Path(config.out)
        self.on_epoch_end = on_epoch_end
        self.on_step = on_step
        self.found = self._find_checkpoint(resume)
        self._saved_at: tuple[int, int, int] | None = None
        self.loaders: RunLoaders | None = None

    # ------------------------------------------------------------------ set-up
    def _find_checkpoint(self, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
        found = find_resume_checkpoint(resume, self.out_dir) if resume else None
        _check_ranks_agree(self.context, "the checkpoint to resume from (epoch, step in epoch, global step)",
                           None if found is None else tuple(int(found[1]["trainer"][k])
                                                            for k in ("epoch", "step_in_epoch", "global_step")))
        if found is None:
            check_fresh(self.out_dir)
            return None
        path, payload = found
        if self.out_dir.resolve() != run_dir_of(path).resolve():
            # Continuing a run somewhere else starts a new run directory: never mix two runs' files.
            check_fresh(self.out_dir)
        _check_resume_config(self.config, payload["config"], path)
        log.info("resuming from %s (epoch %d, step %d)", path,
                 payload["trainer"]["epoch"] + 1, payload["trainer"]["step_in_epoch"])
        return found

    def _prepare_data(self) -> None:
        config, context = self.config, self.context
        self.device = context.device
        self.backend = resolve_backend(config.backend)
        seed_everything(config.seed)
        root = dataset_root(config)
        discovered = discover_dataset(root, fractions=config.split_fractions, seed=config.seed)
        # Rank 0 scans first and fills the manifest; the other ranks then read its verdicts instead of
        # all decoding the whole dataset at once (and raise the same error if rank 0 found bad files).
        # A first scan of a very large dataset can outlast the collective timeout: `msdali scan` once
        # before a multi-process launch fills the manifest.
        if context.is_main:
            try:
                splits = vet_splits(discovered, config)
            finally:
                context.barrier()
        else:
            context.barrier()
            splits = vet_splits(discovered, config)
        _check_ranks_agree(context, "the dataset splits (a hash of every file and label)", _splits_fingerprint(splits))
        self.splits = splits
        self.task = resolve_task(splits.num_classes, config.task)
        self.schedule = build_schedule(config)
        self.resolved = {"data": str(root), "backend": self.backend, "device": str(self.device), "task": self.task,
                         "world_size": context.world_size,
                         "global_batch_size": config.batch_size * context.world_size}
        log.info(
            "data %s: %d classes (%s), %s task; train/val/test = %d/%d/%d; backend %s on %s",
            root, splits.num_classes, ", ".join(splits.classes), self.task,
            len(splits.train), len(splits.val), len(splits.test), self.backend, self.device,
        )
        if context.is_distributed:
            log.info("%d processes, each with batch size %d: global batch %d; each split is sharded over the ranks",
                     context.world_size, config.batch_size, config.batch_size * context.world_size)

    def _make_spec(self, split: SplitFiles, schedule: ScaleSchedule, train: bool) -> LoaderSpec:
        config = self.config
        return LoaderSpec(
            files=split.files, labels=split.labels, schedule=schedule, batch_size=config.batch_size,
            train=train, device=str(self.device), seed=config.seed, num_workers=config.workers,
            drop_last=train and len(split) > config.batch_size, channels_last=config.channels_last,
            shard_id=self.context.rank, num_shards=self.context.world_size,
        )

    def _build(self) -> None:
        config = self.config
        if self.device.type == "cuda":
            # A run sees a small fixed set of input shapes (one per scale), so cuDNN's per-shape
            # autotuning pays for itself after the first steps (as in timm and the DALI examples).
            torch.backends.cudnn.benchmark = True
        model = build_model(config.model, num_outputs=num_outputs(self.task, self.splits.num_classes),
                            pretrained=config.pretrained)
        model = model.to(self.device,
                         memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
        self.optimizer = _optimizer(config, model.parameters())
        # Validation covers every scale the schedule visits, so one eval pipeline serves all epochs
        # (rebuilding DALI pipelines per epoch grows device memory pools).
        self.loaders = RunLoaders(backend=self.backend, make_spec=self._make_spec, splits=self.splits,
                                  train_schedule=self.schedule, eval_schedule=constant_schedule(self.schedule.all_scales))
        # Shards are padded to one size, so every rank runs the same steps per epoch; a rank with
        # fewer would leave the others waiting in a collective until the timeout.
        _check_ranks_agree(self.context, "the batches per epoch (train, val)",
                           (len(self.loaders.train), None if self.loaders.val is None else len(self.loaders.val)))
        trainer_cls = ProgressiveMultiScaleTrainer if config.mode == "progressive" else MultiScaleTrainer
        self.trainer = trainer_cls(
            model,
            loss=ScaleConsistencyLoss(task=self.task, consistency_weight=config.consistency_weight,
                                      consistency_type=config.consistency_type, teacher=config.teacher),
            optimizer=self.optimizer,
            schedule=self.schedule,
            options=TrainerOptions(epochs=config.epochs, amp_dtype=resolve_amp(config.amp, self.device),
                                   grad_clip_norm=config.grad_clip or None, memory_efficient=config.memory_efficient),
            lr_scheduler=_lr_scheduler(config, self.optimizer, len(self.loaders.train)),
            device=self.device,
            distributed=self.context,
        )

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
            start = trainer.epoch * len(self.loaders.train)
            trainer.lr_scheduler = _lr_scheduler(self.config, self.optimizer, len(self.loaders.train),
                                                 start_step=start)
            trainer.global_step = start
        self._restore_best(run_dir_of(path))
        if context.is_main:
            keep_metrics_before(self.out_dir / METRICS_FILE, trainer.epoch)
        self._saved_at = self._position()

    def _restore_best(self, source_dir: Path) -> None:
        """The best weights so far, from the run the checkpoint belongs to.

        They must be the epoch the checkpoint records as best: resuming an older checkpoint (the
        previous one, after a damaged last) can find a best.pt written later. Then the record is
        dropped and the next validated epoch starts the search again, rather than pairing one
        epoch's score with another epoch's weights.
        """
        trainer = self.trainer
        source = best_path(source_dir)
        if trainer.best_epoch is None or not source.exists():
            return
        best = load_checkpoint(source)
        if best.get("epoch") != trainer.best_epoch:
            log.warning("%s holds epoch %s but the checkpoint's best is epoch %s: the best model is chosen "
                        "again from the epochs trained from here", source, best.get("epoch"), trainer.best_epoch)
            trainer.best_state, trainer.best_score, trainer.best_epoch = None, None, None
            return
        trainer.best_state = best["model"]
        if self.context.is_main and source_dir.resolve() != self.out_dir.resolve():
            # A run continued in a new directory carries its best model along.
            atomic_save(best, best_path(self.out_dir))

    # ------------------------------------------------------------------ files (rank 0)
    def _common(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "resolved": self.resolved, "classes": list(self.splits.classes),
                "task": self.task, "schedule": self.schedule.to_dict()}

    def _write_config(self) -> None:
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / CONFIG_FILE, self._common() | {
                "dataset": self.splits.summary(), "argv": sys.argv, "versions": library_versions()})

    def _save_best(self, epoch: int | None, val: dict | None = None) -> None:
        if self.context.is_main:
            atomic_save(self._common() | {"model": self.trainer.net.state_dict(), "epoch": epoch,
                                          "val": {str(s): m for s, m in (val or {}).items()}},
                        best_path(self.out_dir))

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
        if self.context.is_main:
            save_last(self._common() | {
                "trainer": trainer_state, "loaders": [r["loader"] for r in ranks], "rngs": [r["rng"] for r in ranks],
                "rank_steps": [r["global_step"] for r in ranks], "world_size": self.context.world_size},
                self.out_dir)
        self._saved_at = self._position()

    # ------------------------------------------------------------------ callbacks
    def _step_done(self, event: StepEvent) -> None:
        if self.config.checkpoint_every and event.global_step % self.config.checkpoint_every == 0:
            self._save_training_state()
        if self.on_step is not None and self.context.is_main:
            self.on_step(event)

    def _epoch_done(self, record: EpochRecord) -> None:
        if self.context.is_main:
            append_json_line(self.out_dir / METRICS_FILE,
                             {"mode": self.config.mode, "backend": self.backend} | record.to_json())
            if record.is_best:
                self._save_best(record.epoch, record.val)
        self._save_training_state()
        if self.on_epoch_end is not None and self.context.is_main:
            self.on_epoch_end(record)

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        self._prepare_data()
        try:
            self._build()
            if self.found is not None:
                self._restore(*self.found)
            self._write_config()
            val_epoch = None if self.loaders.val is None else self.loaders.val.epoch
            with StopRequest() as stop:
                # The flag is combined over the ranks at every step boundary (torchrun forwards SIGTERM
                # to every worker, but not at the same instant), so all ranks stop after the same step.
                fit = self.trainer.fit(self.loaders.train.epoch, val_epoch, on_epoch_end=self._epoch_done,
                                       on_step=self._step_done, should_stop=lambda: self.context.any_rank(stop.requested))
                if fit.interrupted:
                    return self._interrupted(fit, stop.signal_name)
            test = self._test()
        finally:
            if self.loaders is not None:  # None when building them failed
                self.loaders.close()
        return self._result(fit, test=test)

    def _interrupted(self, fit: FitResult, own_signal: str | None) -> RunResult:
        self._save_training_state()
        signal_name = next((n for n in self.context.all_gather_object(own_signal) if n), None)
        trainer = self.trainer
        log.warning("rank %d/%d stopped by %s at epoch %d step %d (global step %d)%s",
                    self.context.rank, self.context.world_size, signal_name, trainer.epoch + 1,
                    trainer.step_in_epoch, trainer.global_step,
                    "; checkpoint saved, continue with --resume auto" if self.context.is_main else "")
        # Nobody exits before rank 0's checkpoint is on disk.
        self.context.barrier()
        return self._result(fit, test={}, interrupted=True, stop_signal=signal_name)

    def _test(self) -> dict[int, dict[str, float]]:
        """The best model, once, on the test split; results.json."""
        trainer, schedule = self.trainer, self.schedule
        trainer.load_best()
        if trainer.best_state is None:  # no validation split: the final weights are the model
            self._save_best(self.config.epochs - 1)
        test_scales = schedule.final_scales if self.config.mode == "multiscale" else schedule.all_scales
        metrics: dict[int, dict[str, float]] = {}
        if len(self.splits.test):
            loader = self.loaders.test(constant_schedule(test_scales))
            try:
                metrics = trainer.evaluate(loader.epoch(0))
            finally:
                loader.close()
        if self.context.is_main:
            write_json(self.out_dir / RESULTS_FILE, {
                "best_epoch": trainer.best_epoch,
                "best_val_accuracy": None if trainer.best_score is None else trainer.best_score[0],
                "test": {str(s): m for s, m in metrics.items()}, "backend": self.backend,
                "device": str(self.device), "task": self.task, "classes": list(self.splits.classes),
                "world_size": self.context.world_size})
        self.context.barrier()
        return metrics

    def _result(self, fit: FitResult, *, test: dict, interrupted: bool = False,
                stop_signal: str | None = None) -> RunResult:
        return RunResult(
            out_dir=self.out_dir, backend=self.backend, device=str(self.device), task=self.task,
            classes=self.splits.classes, history=fit.history, best_epoch=self.trainer.best_epoch, test=test,
            dataset=self.splits.summary(), interrupted=interrupted, stop_signal=stop_signal,
            rank=self.context.rank, world_size=self.context.world_size,
        )


def library_versions() -> dict[str, str | None]:
    """Versions that decide numerics and speed, written into every run directory."""
    import PIL
    import torchvision

    from multiscale_dali import __version__
    from multiscale_dali.pipelines.factory import dali_version

    return {
        "msdali": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "dali": dali_version(), "pillow": PIL.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
