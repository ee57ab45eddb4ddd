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

from multiscale_dali.checkpoint import CheckpointError, atomic_save
from multiscale_dali.config import RESUME_MUTABLE_KEYS, ConfigError, TrainConfig
from multiscale_dali.constants import SPLIT_NAMES
from multiscale_dali.data import DataError, DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.distributed import DistributedContext, DistributedError, distributed_session, quiet_unless_main
from multiscale_dali.loader_spec import Loader, LoaderSpec
from multiscale_dali.loaders import build_loader, resolve_backend
from multiscale_dali.losses import ScaleConsistencyLoss, num_outputs, resolve_task
from multiscale_dali.models import build_model
from multiscale_dali.resume import best_path, capture_rng_state, find_resume_checkpoint, restore_rng_state, save_last
from multiscale_dali.schedule import (
    ScaleSchedule,
    constant_schedule,
    linear_ramp_schedule,
    parse_steps,
    stepwise_schedule,
)
from multiscale_dali.signals import StopRequest
from multiscale_dali.trainer import (
    EpochRecord,
    MultiScaleTrainer,
    ProgressiveMultiScaleTrainer,
    StepEvent,
    TrainerOptions,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


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


class RunDirectoryError(ValueError):
    """The run directory already holds a run and no ``--resume`` was asked for."""


class ResumeWorldSizeError(CheckpointError):
    """A mid-epoch checkpoint of N processes resumed with another number of processes."""


# ---------------------------------------------------------------------------------------- pieces
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{device} was asked for, but CUDA is not available on this machine")
    return torch.device(device)


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
        return linear_ramp_schedule(
            min_scale=config.scales[0], max_scale=config.scales[-1], epochs=config.epochs,
            multiple=config.ramp_multiple,
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
    from multiscale_dali.sample_data import default_dataset

    return default_dataset(binary=config.default_dataset == "textures-binary")


def scan_cache_path(root: Path) -> Path:
    """One scan manifest per dataset root, shared by every run over it."""
    from multiscale_dali.sample_data import default_cache_dir

    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return default_cache_dir() / "scan" / f"{digest}.json"


def vet_splits(splits: DatasetSplits, config: TrainConfig) -> DatasetSplits:
    """Pre-flight scan of every file: DALI cannot skip a bad file mid-run, so find them first.

    ``on_bad_file="error"`` raises :class:`~multiscale_dali.scan.BadImagesError` naming each bad
    file; ``"skip"`` trains on the good files, every label unchanged.
    """
    from multiscale_dali.scan import filter_good, scan_files

    every_file = [f for name in SPLIT_NAMES for f in splits.split(name).files]
    result = scan_files(every_file, max_pixels=config.max_image_pixels, cache_path=scan_cache_path(Path(splits.root)))
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


def _check_run_directory(out_dir: Path) -> None:
    """A fresh run never writes over another run's metrics or checkpoints."""
    taken = [name for name in (METRICS_FILE, "checkpoints", "best.pt") if (out_dir / name).exists()]
    if taken:
        raise RunDirectoryError(
            f"{out_dir} already holds a run ({', '.join(taken)}); continue it with --resume auto, "
            "or choose another --out"
        )


def _check_resume_config(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    current = config.to_dict()
    for key, value in saved.items():
        if key not in RESUME_MUTABLE_KEYS and key in current and current[key] != value:
            raise ConfigError(
                key, f"is {current[key]!r} but the checkpoint {path} was trained with {value!r}; "
                "resume with the same value or start a new --out"
            )


def _keep_metrics_before(metrics_path: Path, epoch: int) -> None:
    """On resume, epochs at or after the checkpoint will be trained again: set their lines aside."""
    if not metrics_path.exists():
        return
    keep, drop = [], []
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line)["epoch"] < epoch else drop).append(line)
    if drop:
        with (metrics_path.parent / SUPERSEDED_METRICS_FILE).open("a") as handle:
            handle.write("\n".join(drop) + "\n")
        metrics_path.write_text("".join(line + "\n" for line in keep))


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


def _append_json_line(path: Path, record: dict) -> None:
    # Append and fsync each epoch: a crash later never loses the epochs already written.
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


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
        return _run_training(config, context, resume=resume, on_epoch_end=on_epoch_end, on_step=on_step)


def _run_training(
    config: TrainConfig,
    context: DistributedContext,
    *,
    resume: str | None,
    on_epoch_end: Callable[[EpochRecord], None] | None,
    on_step: Callable[[StepEvent], None] | None,
) -> RunResult:
    out_dir = Path(config.out)
    found = find_resume_checkpoint(resume, out_dir) if resume else None
    _check_ranks_agree(context, "the checkpoint to resume from (epoch, step in epoch, global step)",
                       None if found is None else tuple(int(found[1]["trainer"][k])
                                                        for k in ("epoch", "step_in_epoch", "global_step")))
    keep_loader_states = True
    if found is None:
        _check_run_directory(out_dir)
    else:
        _check_resume_config(config, found[1]["config"], found[0])
        keep_loader_states = _resume_keeps_loader_states(found[1], found[0], context.world_size)
        log.info("resuming from %s (epoch %d, step %d)", found[0],
                 found[1]["trainer"]["epoch"] + 1, found[1]["trainer"]["step_in_epoch"])
    device = context.device
    backend = resolve_backend(config.backend)
    seed_everything(config.seed)
    root = dataset_root(config)
    splits = discover_dataset(root, fractions=config.split_fractions, seed=config.seed)
    splits = vet_splits(splits, config)
    _check_ranks_agree(context, "the dataset splits (a hash of every file and label)", _splits_fingerprint(splits))
    task = resolve_task(splits.num_classes, config.task)
    schedule = build_schedule(config)
    # Validation covers every scale the schedule visits, so one eval pipeline serves all epochs
    # (rebuilding DALI pipelines per epoch grows device memory pools).
    eval_schedule = constant_schedule(schedule.all_scales)
    log.info(
        "data %s: %d classes (%s), %s task; train/val/test = %d/%d/%d; backend %s on %s",
        root, splits.num_classes, ", ".join(splits.classes), task,
        len(splits.train), len(splits.val), len(splits.test), backend, device,
    )
    if context.is_distributed:
        log.info("%d processes, each with batch size %d: global batch %d; each split is sharded over the ranks",
                 context.world_size, config.batch_size, config.batch_size * context.world_size)

    def make_spec(split: SplitFiles, sched: ScaleSchedule, train: bool) -> LoaderSpec:
        return LoaderSpec(
            files=split.files, labels=split.labels, schedule=sched, batch_size=config.batch_size,
            train=train, device=str(device), seed=config.seed, num_workers=config.workers,
            drop_last=train and len(split) > config.batch_size, channels_last=config.channels_last,
            shard_id=context.rank, num_shards=context.world_size,
        )

    model = build_model(config.model, num_outputs=num_outputs(task, splits.num_classes), pretrained=config.pretrained)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    optimizer = _optimizer(config, model.parameters())
    loaders = RunLoaders(backend=backend, make_spec=make_spec, splits=splits,
                         train_schedule=schedule, eval_schedule=eval_schedule)
    try:
        # Shards are padded to one size, so every rank runs the same steps per epoch; a rank with
        # fewer would leave the others waiting in a collective until the timeout.
        _check_ranks_agree(context, "the batches per epoch (train, val)",
                           (len(loaders.train), None if loaders.val is None else len(loaders.val)))
        trainer_cls = ProgressiveMultiScaleTrainer if config.mode == "progressive" else MultiScaleTrainer
        trainer = trainer_cls(
            model,
            loss=ScaleConsistencyLoss(
                task=task, consistency_weight=config.consistency_weight,
                consistency_type=config.consistency_type, teacher=config.teacher,
            ),
            optimizer=optimizer,
            schedule=schedule,
            options=TrainerOptions(
                epochs=config.epochs, amp_dtype=resolve_amp(config.amp, device),
                grad_clip_norm=config.grad_clip or None, memory_efficient=config.memory_efficient,
            ),
            lr_scheduler=_lr_scheduler(config, optimizer, len(loaders.train)),
            device=device,
            distributed=context,
        )
        resolved = {"data": str(root), "backend": backend, "device": str(device), "task": task,
                    "world_size": context.world_size, "global_batch_size": config.batch_size * context.world_size}
        metrics_path = out_dir / METRICS_FILE
        if context.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        if found is not None:
            payload = found[1]
            trainer.load_state_dict(payload["trainer"])
            # Checkpoints of one process before sharding existed hold a single "loader" and "rng".
            loader_states = payload.get("loaders") or [payload["loader"]]
            rng_states = payload.get("rngs") or [payload["rng"]]
            if keep_loader_states:
                loaders.train.load_state_dict(loader_states[context.rank])
                restore_rng_state(rng_states[context.rank])
            else:
                restore_rng_state(rng_states[0])
                # The schedule counts steps, and an epoch now has another number of them: continue at
                # the step this epoch boundary has under the new sharding.
                start = trainer.epoch * len(loaders.train)
                trainer.lr_scheduler = _lr_scheduler(config, optimizer, len(loaders.train), start_step=start)
                trainer.global_step = start
            if trainer.best_epoch is not None and best_path(out_dir).exists():
                from multiscale_dali.checkpoint import load_checkpoint

                trainer.best_state = load_checkpoint(best_path(out_dir))["model"]
            if context.is_main:
                _keep_metrics_before(metrics_path, trainer.epoch)
        if context.is_main:
            (out_dir / CONFIG_FILE).write_text(json.dumps(
                {"config": config.to_dict(), "resolved": resolved, "schedule": schedule.to_dict(),
                 "classes": list(splits.classes), "dataset": splits.summary(), "argv": sys.argv,
                 "versions": library_versions()}, indent=2))

        def model_payload(epoch: int | None, val: dict | None = None) -> dict[str, Any]:
            return {"model": trainer.net.state_dict(), "config": config.to_dict(), "resolved": resolved,
                    "classes": list(splits.classes), "task": task, "schedule": schedule.to_dict(),
                    "epoch": epoch, "val": {str(s): m for s, m in (val or {}).items()}}

        def save_training_state() -> None:
            # A collective: every rank contributes its own loader position and RNG state (each shard is
            # at its own place), and rank 0 writes the one checkpoint.
            trainer_state = trainer.state_dict()
            ranks = context.all_gather_object(
                {"loader": loaders.train.state_dict(), "rng": capture_rng_state(), "global_step": trainer.global_step})
            if context.is_main:
                save_last({"trainer": trainer_state, "loaders": [r["loader"] for r in ranks],
                           "rngs": [r["rng"] for r in ranks], "rank_steps": [r["global_step"] for r in ranks],
                           "config": config.to_dict(), "resolved": resolved, "classes": list(splits.classes),
                           "task": task, "schedule": schedule.to_dict(), "world_size": context.world_size}, out_dir)

        def step_done(event: StepEvent) -> None:
            if config.checkpoint_every and event.global_step % config.checkpoint_every == 0:
                save_training_state()
            if on_step is not None and context.is_main:
                on_step(event)

        def epoch_done(record: EpochRecord) -> None:
            if context.is_main:
                _append_json_line(metrics_path, {"mode": config.mode, "backend": backend} | record.to_json())
                if record.is_best:
                    atomic_save(model_payload(record.epoch, record.val), best_path(out_dir))
            save_training_state()
            if on_epoch_end is not None and context.is_main:
                on_epoch_end(record)

        val_epoch = None if loaders.val is None else loaders.val.epoch
        with StopRequest() as stop:
            # The flag is combined over the ranks at every step boundary (torchrun forwards SIGTERM to
            # every worker, but not at the same instant), so all ranks stop after the same step.
            result = trainer.fit(loaders.train.epoch, val_epoch, on_epoch_end=epoch_done, on_step=step_done,
                                 should_stop=lambda: context.any_rank(stop.requested))
            if result.interrupted:
                save_training_state()
                signal_name = next((n for n in context.all_gather_object(stop.signal_name) if n), None)
                log.warning("rank %d/%d stopped by %s at epoch %d step %d (global step %d)%s",
                            context.rank, context.world_size, signal_name, trainer.epoch + 1,
                            trainer.step_in_epoch, trainer.global_step,
                            "; checkpoint saved, continue with --resume auto" if context.is_main else "")
                # Nobody exits before rank 0's checkpoint is on disk.
                context.barrier()
                return RunResult(out_dir=out_dir, backend=backend, device=str(device), task=task,
                                 classes=splits.classes, history=result.history, best_epoch=result.best_epoch,
                                 test={}, dataset=splits.summary(), interrupted=True,
                                 stop_signal=signal_name, rank=context.rank, world_size=context.world_size)
        trainer.load_best()
        if trainer.best_state is None and context.is_main:  # no validation split: the final weights are the model
            atomic_save(model_payload(config.epochs - 1), best_path(out_dir))
        test_scales = schedule.final_scales if config.mode == "multiscale" else schedule.all_scales
        test_metrics: dict[int, dict[str, float]] = {}
        if len(splits.test):
            test_loader = loaders.test(constant_schedule(test_scales))
            try:
                test_metrics = trainer.evaluate(test_loader.epoch(0))
            finally:
                test_loader.close()
        if context.is_main:
            (out_dir / RESULTS_FILE).write_text(json.dumps(
                {"best_epoch": trainer.best_epoch, "best_val_accuracy": None if trainer.best_score is None
                 else trainer.best_score[0], "test": {str(s): m for s, m in test_metrics.items()},
                 "backend": backend, "device": str(device), "task": task, "classes": list(splits.classes),
                 "world_size": context.world_size}, indent=2))
        context.barrier()
    finally:
        loaders.close()
    return RunResult(
        out_dir=out_dir, backend=backend, device=str(device), task=task, classes=splits.classes,
        history=result.history, best_epoch=trainer.best_epoch, test=test_metrics, dataset=splits.summary(),
        rank=context.rank, world_size=context.world_size,
    )


def library_versions() -> dict[str, str | None]:
    """Versions that decide numerics and speed, written into every run directory."""
    import PIL
    import torchvision

    from multiscale_dali import __version__
    from multiscale_dali.loaders import dali_version

    return {
        "msdali": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "dali": dali_version(), "pillow": PIL.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
