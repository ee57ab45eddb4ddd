"""Wiring of one training run: configuration in, run directory and results out.

The CLI parses flags into a :class:`TrainConfig` and calls :func:`run_training`; everything here is
plain library code (logging, no prints), so tests and notebooks can call it directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from multiscale_dali.checkpoint import atomic_save
from multiscale_dali.config import TrainConfig
from multiscale_dali.data import DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.loader_spec import Loader, LoaderSpec
from multiscale_dali.loaders import build_loader, resolve_backend
from multiscale_dali.losses import ScaleConsistencyLoss, num_outputs, resolve_task
from multiscale_dali.models import build_model
from multiscale_dali.schedule import (
    ScaleSchedule,
    constant_schedule,
    linear_ramp_schedule,
    parse_steps,
    stepwise_schedule,
)
from multiscale_dali.trainer import (
    EpochRecord,
    MultiScaleTrainer,
    ProgressiveMultiScaleTrainer,
    TrainerOptions,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
BEST_CHECKPOINT = "best.pt"


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but CUDA is not available on this machine")
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
    if config.schedule:
        return stepwise_schedule(parse_steps(config.schedule))
    return linear_ramp_schedule(
        min_scale=config.scales[0],
        max_scale=config.scales[-1],
        epochs=config.epochs,
        multiple=config.ramp_multiple,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_root(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    from multiscale_dali.sample_data import default_dataset

    return default_dataset(binary=config.default_dataset == "textures-binary")


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RunLoaders:
    """The train/val/test loaders of one run, built lazily and closed together."""

    def __init__(self, *, backend: str, make_spec: Callable[[SplitFiles, ScaleSchedule, bool], LoaderSpec],
                 splits: DatasetSplits, train_schedule: ScaleSchedule, eval_schedule: ScaleSchedule) -> None:
        self.backend = backend
        self._make_spec = make_spec
        self.train = build_loader(make_spec(splits.train, train_schedule, True), backend=backend)
        self.val = (
            build_loader(make_spec(splits.val, eval_schedule, False), backend=backend) if len(splits.val) else None
        )
        self._splits = splits
        self._eval_schedule = eval_schedule

    def test(self, schedule: ScaleSchedule) -> Loader:
        return build_loader(self._make_spec(self._splits.test, schedule, False), backend=self.backend)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()


def run_training(
    config: TrainConfig,
    *,
    on_epoch_end: Callable[[EpochRecord], None] | None = None,
) -> RunResult:
    """Train, keep the best model on validation, evaluate it once on the test split."""
    out_dir = Path(config.out)
    device = resolve_device(config.device)
    backend = resolve_backend(config.backend)
    seed_everything(config.seed)
    root = dataset_root(config)
    splits = discover_dataset(root, fractions=config.split_fractions, seed=config.seed)
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

    def make_spec(split: SplitFiles, sched: ScaleSchedule, train: bool) -> LoaderSpec:
        return LoaderSpec(
            files=split.files, labels=split.labels, schedule=sched, batch_size=config.batch_size,
            train=train, device=str(device), seed=config.seed, num_workers=config.workers,
            drop_last=train and len(split) > config.batch_size, channels_last=config.channels_last,
        )

    model = build_model(config.model, num_outputs=num_outputs(task, splits.num_classes), pretrained=config.pretrained)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    optimizer = _optimizer(config, model.parameters())
    loaders = RunLoaders(backend=backend, make_spec=make_spec, splits=splits,
                         train_schedule=schedule, eval_schedule=eval_schedule)
    try:
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
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        effective = config.to_dict() | {"data": str(root), "backend": backend, "device": str(device), "task": task}
        (out_dir / CONFIG_FILE).write_text(json.dumps(
            {"config": effective, "schedule": schedule.to_dict(), "classes": list(splits.classes),
             "dataset": splits.summary(), "argv": sys.argv}, indent=2))
        metrics_path = out_dir / METRICS_FILE

        def record_epoch(record: EpochRecord) -> None:
            # Append and flush each epoch: a crash later never loses the epochs already written.
            with metrics_path.open("a") as handle:
                handle.write(json.dumps({"mode": config.mode, "backend": backend} | record.to_json()) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            if on_epoch_end is not None:
                on_epoch_end(record)

        val_epoch = None if loaders.val is None else loaders.val.epoch
        result = trainer.fit(loaders.train.epoch, val_epoch, on_epoch_end=record_epoch)
        trainer.load_best()
        test_scales = schedule.final_scales if config.mode == "multiscale" else schedule.all_scales
        test_metrics: dict[int, dict[str, float]] = {}
        if len(splits.test):
            test_loader = loaders.test(constant_schedule(test_scales))
            try:
                test_metrics = trainer.evaluate(test_loader.epoch(0))
            finally:
                test_loader.close()
        atomic_save(
            {"model": model.state_dict(), "config": effective, "classes": list(splits.classes),
             "task": task, "epoch": result.best_epoch if result.best_epoch is not None else config.epochs - 1},
            out_dir / BEST_CHECKPOINT,
        )
        (out_dir / RESULTS_FILE).write_text(json.dumps(
            {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
             "test": {str(s): m for s, m in test_metrics.items()}, "backend": backend,
             "device": str(device), "task": task, "classes": list(splits.classes)}, indent=2))
    finally:
        loaders.close()
    return RunResult(
        out_dir=out_dir, backend=backend, device=str(device), task=task, classes=splits.classes,
        history=result.history, best_epoch=result.best_epoch, test=test_metrics, dataset=splits.summary(),
    )
