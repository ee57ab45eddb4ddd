"""``msdali finetune-res``: FixRes fine-tuning of a trained run for one deployment resolution.

FixRes (Touvron et al. 2019): a network trained on random-resized crops and tested on centre crops
sees objects at another apparent size than in training; at a deployment resolution other than the
training one the gap grows. The fix after training is a short fine-tuning at the deployment resolution
*with the test-time geometry* (centre crop, no flip: the eval pipelines) in which only the BatchNorm
affine parameters and the classifier learn (:func:`~multiscale_dali.training.finetune_res.freeze_for_fixres`).
``evaluate --recalibrate-bn`` is the statistics-only half of it; this adds the learnt part.

* Data: the run's own train split (same dataset, fractions and seed), shuffled per epoch by a seeded
  permutation (eval loaders read in file order, which is sorted by class, and a batch of one class
  would skew the batch statistics the BatchNorm layers normalise with in train mode).
* BatchNorm running statistics: reset at the start of every epoch and re-estimated as a cumulative
  average over that epoch's batches (``momentum=None``), so after the last epoch they describe the
  deployment resolution alone rather than an exponential mix with the training statistics.
* Model selection: the epoch with the best validation accuracy at the scale (when there is a
  validation split); the test split is measured once before (the weights as trained) and once after.
* Output: a new run directory (never the source's), with ``config.json``, ``metrics.jsonl``,
  ``best.pt`` and ``results.json`` like a training run, so ``evaluate``/``predict``/``export`` take it as
  they take any run; its schedule is the one scale, which ``evaluate`` then measures by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch import nn

from multiscale_dali.constants import FINETUNE_LR, Backend
from multiscale_dali.data.discovery import SplitFiles
from multiscale_dali.errors import ConfigError
from multiscale_dali.evaluation.evaluate import load_splits, resolve_data_root
from multiscale_dali.evaluation.model import LoadedModel, load_model
from multiscale_dali.models.input_size import check_model_scales
from multiscale_dali.models.scale_norm import collapse_scale_norm
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.factory import build_loader, resolve_backend
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.training.distributed import resolve_device
from multiscale_dali.training.finetune_res import FixResPlan, freeze_for_fixres
from multiscale_dali.training.losses import ScaleConsistencyLoss, num_outputs
from multiscale_dali.training.run_directory import check_fresh
from multiscale_dali.training.run_files import RunFiles
from multiscale_dali.training.run_setup import build_lr_scheduler, build_optimizer, resolve_amp, seed_everything
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

log = logging.getLogger(__name__)

DEFAULT_FINETUNE_LR = FINETUNE_LR  # why this value: constants.py
DEFAULT_FINETUNE_EPOCHS = 1
# Seed stream of the per-epoch shuffles, apart from every stream of the training run.
SHUFFLE_SEED_OFFSET = 104_729
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class FinetuneOptions:
    scale: int
    epochs: int = DEFAULT_FINETUNE_EPOCHS
    out: str | None = None  # None: RUN_DIR-fixres<scale> beside the source run
    lr: float = DEFAULT_FINETUNE_LR
    batch_size: int | None = None  # None: the run's
    backend: str = Backend.AUTO.value
    device: str = "auto"
    workers: int = 2
    data: str | None = None  # None: the dataset the run trained on

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ConfigError("scale", f"must be >= 1, got {self.scale}")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class FinetuneResult:
    out_dir: Path
    scale: int
    plan: dict[str, Any]  # FixResPlan.to_json(): what was fine-tuned
    before: dict[str, float]  # test loss/accuracy at the scale, weights as trained (empty: no test split)
    after: dict[str, float]  # the same with the fine-tuned weights
    best_epoch: int | None


def default_finetune_dir(run_dir: Path, scale: int) -> Path:
    return run_dir.parent / f"{run_dir.name}-fixres{scale}"


def _shuffled(split: SplitFiles, *, seed: int) -> SplitFiles:
    order = np.random.default_rng(seed + SHUFFLE_SEED_OFFSET).permutation(len(split))
    return SplitFiles(files=tuple(split.files[i] for i in order), labels=tuple(split.labels[i] for i in order))


def _restart_statistics(model: nn.Module) -> None:
    """Running statistics from scratch, as a cumulative average over the batches to come."""
    for module in model.modules():
        if isinstance(module, _BATCHNORM):
            module.reset_running_stats()
            module.momentum = None


class _Job:
    """One fine-tuning: the source model, its data at the scale, the trainer and the new run's files."""

    def __init__(self, loaded: LoadedModel, *, options: FinetuneOptions, out: Path) -> None:
        self.loaded, self.options, self.scale = loaded, options, options.scale
        self.backend = resolve_backend(options.backend)
        self.splits = load_splits(loaded, resolve_data_root(loaded, options.data))
        # A model with BatchNorm private to each trained scale keeps the branch nearest to the new
        # scale: the fine-tuned network is a plain one for that resolution.
        collapse_scale_norm(loaded.model, self.scale)
        self.config = loaded.config.replace(
            out=str(out), mode="multiscale", scales=(self.scale,), schedule="", scale_norm="shared",
            epochs=options.epochs, lr=options.lr,
            warmup_epochs=0.0, lr_schedule="cosine", consistency_weight=0.0, backend=options.backend,
            device=options.device, workers=options.workers,
            batch_size=options.batch_size or loaded.config.batch_size)
        self.schedule = constant_schedule((self.scale,))
        self.files = RunFiles(out, is_main=True, common={
            "config": self.config.to_dict(), "classes": list(loaded.classes), "task": loaded.task,
            "schedule": self.schedule.to_dict(),
            "resolved": {"data": loaded.resolved.get("data"), "backend": self.backend, "device": str(loaded.device),
                         "task": loaded.task, "world_size": 1, "finetuned_from": str(loaded.path)}})

    def spec(self, split: SplitFiles, *, drop_last: bool = False) -> LoaderSpec:
        config = self.config
        return LoaderSpec(files=split.files, labels=split.labels, schedule=self.schedule, batch_size=config.batch_size,
                          train=False, device=str(self.loaded.device), seed=config.seed, num_workers=config.workers,
                          drop_last=drop_last, channels_last=config.channels_last)

    def batches(self, split: SplitFiles, *, drop_last: bool = False) -> Iterator[MultiScaleBatch]:
        loader = build_loader(self.spec(split, drop_last=drop_last), backend=self.backend)
        try:
            yield from loader.epoch(0)
        finally:
            loader.close()

    def train_batches(self, epoch: int) -> Iterator[MultiScaleBatch]:
        _restart_statistics(self.loaded.model)  # runs at the epoch's first batch, before its first step
        # A last batch of a few images would normalise with a noisy batch mean; leave it out when the
        # split holds at least one full batch.
        drop_last = len(self.splits.train) >= self.config.batch_size
        yield from self.batches(_shuffled(self.splits.train, seed=self.config.seed + epoch), drop_last=drop_last)

    def trainer(self, plan: FixResPlan) -> MultiScaleTrainer:
        config, device = self.config, self.loaded.device
        optimizer = build_optimizer(config, list(plan.parameters))
        steps = self.spec(self.splits.train, drop_last=len(self.splits.train) >= config.batch_size).steps_per_epoch
        return MultiScaleTrainer(
            self.loaded.model, loss=ScaleConsistencyLoss(task=self.loaded.task), optimizer=optimizer,
            schedule=self.schedule, options=TrainerOptions(epochs=config.epochs,
                                                           amp_dtype=resolve_amp(config.amp, device)),
            lr_scheduler=build_lr_scheduler(config, optimizer, steps), device=device)

    def test(self, trainer: MultiScaleTrainer) -> dict[str, float]:
        if not len(self.splits.test):
            return {}
        return trainer.evaluate(self.batches(self.splits.test))[self.scale]


def finetune_resolution(checkpoint: str | Path, *, options: FinetuneOptions) -> FinetuneResult:
    """Fine-tune ``checkpoint`` at ``options.scale`` (see the module doc) into a new run directory.

    Raises :class:`~multiscale_dali.models.registry.ModelError` for a scale the model cannot run at,
    :class:`~multiscale_dali.training.run_directory.RunDirectoryError` when the output holds a run,
    and :class:`~multiscale_dali.training.finetune_res.FixResError` for a model without a Linear head.
    A model without BatchNorm has its classifier fine-tuned alone (``plan["classifier_only"]``).
    """
    loaded = load_model(checkpoint, device=resolve_device(options.device))
    check_model_scales(loaded.config.model, (options.scale,),
                       num_outputs=num_outputs(loaded.task, len(loaded.classes)))
    out = Path(options.out) if options.out else default_finetune_dir(loaded.run_dir, options.scale)
    check_fresh(out)
    seed_everything(loaded.config.seed)
    job = _Job(loaded, options=options, out=out)
    plan = freeze_for_fixres(loaded.model)
    trainer = job.trainer(plan)
    before = job.test(trainer)
    job.files.write_config(dataset=job.splits.summary())

    def epoch_done(record: Any) -> None:
        job.files.append_epoch(record, mode=job.config.mode, backend=job.backend)
        if record.is_best:
            job.files.save_best(loaded.model, epoch=record.epoch, val=record.val)

    val = (lambda epoch: job.batches(job.splits.val)) if len(job.splits.val) else None
    fit = trainer.fit(job.train_batches, val, on_epoch_end=epoch_done)
    if not trainer.load_best():  # no validation split: the last epoch's weights are the model
        job.files.save_best(loaded.model, epoch=options.epochs - 1)
    after = job.test(trainer)
    plan.remove_hook()
    job.files.write_results({
        "best_epoch": fit.best_epoch, "test": {str(options.scale): after} if after else {},
        "before": {str(options.scale): before} if before else {}, "backend": job.backend,
        "device": str(loaded.device), "task": loaded.task, "classes": list(loaded.classes), "world_size": 1,
        "finetune": {"source": str(loaded.path), "scale": options.scale, "epochs": options.epochs,
                     "lr": options.lr, **plan.to_json()}})
    return FinetuneResult(out_dir=out, scale=options.scale, plan=plan.to_json(), before=before, after=after,
                          best_epoch=fit.best_epoch)
