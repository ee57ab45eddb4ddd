"""Evaluate a trained checkpoint at several resolutions, and their ensemble.

A run's ``best.pt`` (or a training checkpoint ``checkpoints/last.pt``) is rebuilt into its model;
the chosen split of the run's dataset is evaluated at every requested scale with the eval geometry
of the pipelines (centre crop of ``EVAL_CROP_FRACTION``, antialiased resize), and the multi-scale
ensemble (mean of the scales' probabilities) is reported as its own row.

Each scale is read through its own single-scale loader, i.e. resized straight from the crop. The
multi-scale pipelines resize smaller scales from the largest output instead (cheaper, same region);
in a sweep that would make the number reported for 96 px depend on whether 192 px is also in the
sweep. A resolution's number here is what a deployment at that one resolution (or
``predict --scale``) computes, whatever else is measured beside it.

``recalibrate_bn`` re-estimates the BatchNorm running statistics at each resolution before measuring
it (``batchnorm``). The statistics are estimated from the TRAIN split, never from the split being
measured, and with the *eval* crop geometry rather than training augmentation: the statistics must
describe what the network sees at test time, and random-resized crops zoom in (objects look larger)
which is exactly the discrepancy being corrected. Each scale gets its own copy of the model, so one
scale's statistics never leak into another's.

The model rebuild lives in ``model``, the table in ``report``, image-file prediction in ``predict``.
"""

from __future__ import annotations

import logging
import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from multiscale_dali.constants import SPLITS_FILE, TTA_CHOICES, Backend, Tta
from multiscale_dali.data.discovery import DataError, DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.data.packed import PackedSplit, PackedSplits, is_packed_dir, load_packed
from multiscale_dali.evaluation.batchnorm import recalibrate_batchnorm
from multiscale_dali.evaluation.model import LoadedModel, load_model
from multiscale_dali.evaluation.predict import ImageError, default_predict_scales, predict_images
from multiscale_dali.evaluation.report import (
    AS_TRAINED,
    BN_RECALIBRATED,
    EvalReport,
    best_by_variant,
    default_eval_path,
    format_report,
    rows_from_logits,
)
from multiscale_dali.evaluation.tta import horizontal_flip
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.training.config import ConfigError, check_scales
from multiscale_dali.training.losses import ensemble_logits

# The command line imports these from here; each is defined in the module named above it.
__all__ = [
    "EvalOptions", "evaluate_checkpoint",
    "default_eval_path", "format_report",  # report
    "load_model",  # model
    "ImageError", "default_predict_scales", "predict_images",  # predict
]

log = logging.getLogger(__name__)

EVAL_SPLITS: tuple[str, ...] = ("test", "val")
# Up to this many train batches re-estimate BatchNorm statistics (FixRes-style recalibration needs
# a few thousand images at most; more only costs time).
DEFAULT_BN_BATCHES = 50
DEFAULT_EVAL_BATCH_SIZE = 64
# Seed stream of the train subset used for BN recalibration: independent of any training stream.
BN_SUBSET_SEED_OFFSET = 7919


# ---------------------------------------------------------------------------------------- data
def resolve_data_root(loaded: LoadedModel, data: str | Path | None) -> Path:
    """``data``, else the dataset the run trained on (rebuilt when it was the embedded one)."""
    if data is not None:
        return Path(data)
    recorded = loaded.resolved.get("data")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if loaded.config.data is None:  # the embedded dataset: deterministic, so it can be rebuilt here
        from multiscale_dali.training.run import dataset_root

        return dataset_root(loaded.config)
    raise DataError(f"the run's dataset {recorded or loaded.config.data} is not here; give its location with --data")


def load_splits(loaded: LoadedModel, root: Path) -> DatasetSplits | PackedSplits:
    """The run's splits of ``root``: same fractions and seed, so a carved-out split is the same one;
    on the run's own dataset, its recorded val and test files (see ``training.split_record``).

    Files the pre-flight scan finds unreadable are left out with a warning naming them (DALI cannot
    skip a bad file mid-pass); ``num_samples`` in the report shows what was measured. A packed
    directory's splits are its own, checked against its manifest.
    """
    from multiscale_dali.training.run import vet_splits

    if is_packed_dir(root):
        return _packed_splits(loaded, root)
    splits = discover_dataset(root, fractions=loaded.config.split_fractions, seed=loaded.config.seed)
    if splits.classes != loaded.classes:
        raise DataError(
            f"{root} has classes {', '.join(splits.classes)}, the checkpoint was trained on "
            f"{', '.join(loaded.classes)}"
        )
    lenient = loaded.config.replace(on_bad_file="skip")
    vetted = vet_splits(splits, lenient)  # what the run fingerprinted: the splits after its scan
    recorded = _as_recorded(loaded, vetted)
    # Recorded files were good when the run read them; the scan cache makes this second look cheap.
    return vetted if recorded is vetted else vet_splits(recorded, lenient)


def _as_recorded(loaded: LoadedModel, splits: DatasetSplits) -> DatasetSplits:
    """The run's own dataset split as the run split it: its recorded held-out files, or an error when
    only the fingerprint is recorded and the dataset changed (a re-split could test on train images).

    Another dataset (``--data`` elsewhere) is split afresh: it shares no images with the training.
    """
    from multiscale_dali.training.run_data import splits_fingerprint
    from multiscale_dali.training.split_record import read_split_record, recorded_splits

    recorded_root, fingerprint = loaded.resolved.get("data"), loaded.resolved.get("split_fingerprint")
    if not recorded_root or os.path.realpath(recorded_root) != os.path.realpath(splits.root):
        return splits
    record = read_split_record(loaded.run_dir)
    current = splits_fingerprint(splits)
    if record is not None:
        if record.get("fingerprint") != current:
            log.warning("%s changed since the run split it: evaluating the val/test files the run recorded in %s",
                        splits.root, loaded.run_dir / SPLITS_FILE)
        return recorded_splits(splits, record, source=loaded.run_dir / SPLITS_FILE)
    if fingerprint is not None and fingerprint != current:
        raise DataError(
            f"{splits.root} changed since the checkpoint was trained (files added, removed or renamed), and its "
            f"split was not recorded ({loaded.run_dir / SPLITS_FILE} is missing): a fresh split could put training "
            "images in the test split. Evaluate on the dataset as it was, or copy the run's splits.json beside "
            "the checkpoint")
    return splits


def _packed_splits(loaded: LoadedModel, root: Path) -> PackedSplits:
    from multiscale_dali.data.shard_verify import verify_shards

    packed = load_packed(root)
    if packed.classes != loaded.classes:
        raise DataError(f"the pack {root} has classes {', '.join(packed.classes)}, the checkpoint was trained on "
                        f"{', '.join(loaded.classes)}")
    verify_shards(packed.manifest, deep=False)
    return packed


def _train_subset(train: SplitFiles | PackedSplit, *, count: int, seed: int) -> SplitFiles | PackedSplit:
    """A seeded random subset: eval loaders read files in order, and files are sorted by class, so
    the first batches of the unshuffled split would hold one class only and bias the statistics.
    A packed split is stored in a seeded permutation already: its first ``count`` samples, which
    the recalibration stops after, are the random subset."""
    if isinstance(train, PackedSplit):
        return train
    order = np.random.default_rng(seed + BN_SUBSET_SEED_OFFSET).permutation(len(train))[:count]
    return SplitFiles(files=tuple(train.files[i] for i in order), labels=tuple(train.labels[i] for i in order))


# ---------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class EvalOptions:
    scales: tuple[int, ...] | None = None  # None: every scale the run trained at
    split: str = "test"
    data: str | None = None  # None: the run's dataset
    backend: str = Backend.AUTO
    device: str = "auto"
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    workers: int = 2
    recalibrate_bn: bool = False
    bn_batches: int = DEFAULT_BN_BATCHES
    tta: str = Tta.NONE.value  # "flip": also rows with the mean over each image and its mirror

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise ConfigError("split", f"{self.split!r} is not one of {', '.join(EVAL_SPLITS)}")
        if self.tta not in TTA_CHOICES:
            raise ConfigError("tta", f"{self.tta!r} is not one of {', '.join(TTA_CHOICES)}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.bn_batches < 1:
            raise ConfigError("bn_batches", f"must be >= 1, got {self.bn_batches}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")


def _eval_spec(split: SplitFiles | PackedSplit, scales: tuple[int, ...], *, options: EvalOptions,
               loaded: LoadedModel) -> LoaderSpec:
    from multiscale_dali.training.run_data import split_source

    return LoaderSpec(
        **split_source(split), schedule=constant_schedule(scales), batch_size=options.batch_size,
        train=False, device=str(loaded.device), seed=loaded.config.seed, num_workers=options.workers,
        channels_last=loaded.config.channels_last,
    )


def _batches_at(split: SplitFiles | PackedSplit, scale: int, *, options: EvalOptions, loaded: LoadedModel,
                backend: str) -> Iterator[MultiScaleBatch]:
    """One pass over ``split`` at one scale with the eval geometry; the loader is closed after it."""
    from multiscale_dali.pipelines.factory import build_loader

    loader = build_loader(_eval_spec(split, (scale,), options=options, loaded=loaded), backend=backend)
    try:
        yield from loader.epoch(0)
    finally:
        loader.close()


def _recalibrated_models(loaded: LoadedModel, train: SplitFiles | PackedSplit, scales: tuple[int, ...], *,
                         options: EvalOptions, backend: str) -> dict[int, nn.Module]:
    """One BN-recalibrated copy of the model per scale, from the same train images at each scale."""
    subset = _train_subset(train, count=options.bn_batches * options.batch_size, seed=loaded.config.seed)
    models = {}
    for scale in scales:
        # closing(): recalibration may stop before the loader is exhausted; its pipeline closes anyway.
        with closing(_batches_at(subset, scale, options=options, loaded=loaded, backend=backend)) as batches:
            models[scale] = recalibrate_batchnorm(loaded.model, (batch.images[scale] for batch in batches),
                                                  max_batches=options.bn_batches)
    log.info("BatchNorm statistics re-estimated at %s px from %d train images", ",".join(map(str, scales)),
             min(len(subset), options.bn_batches * options.batch_size))
    return models


Views = dict[tuple[str, str], dict[int, torch.Tensor]]  # (variant, tta) -> scale -> logits


def _view_logits(model: nn.Module, images: torch.Tensor, *, task: str, flip: bool) -> dict[str, torch.Tensor]:
    """Logits of the plain view and, with ``flip``, of the flip TTA (the plain forward is reused)."""
    plain = model(images).float()
    views = {Tta.NONE.value: plain.cpu()}
    if flip:
        mirrored = model(horizontal_flip(images)).float()
        views[Tta.FLIP.value] = ensemble_logits([plain, mirrored], task=task).cpu()
    return views


@torch.no_grad()
def _collect_logits(models: Mapping[str, Mapping[int, nn.Module]], split: SplitFiles | PackedSplit,
                    scales: tuple[int, ...], *,
                    options: EvalOptions, loaded: LoadedModel, backend: str) -> tuple[Views, torch.Tensor]:
    """Logits of every (variant, tta, scale) over the whole split; one pass per scale."""
    flip = options.tta == Tta.FLIP
    ttas = (Tta.NONE.value, Tta.FLIP.value) if flip else (Tta.NONE.value,)
    outputs: Views = {(v, t): {} for v in models for t in ttas}
    labels: torch.Tensor | None = None
    for scale in scales:
        chunks: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in outputs}
        scale_labels = []
        for batch in _batches_at(split, scale, options=options, loaded=loaded, backend=backend):
            for variant, by_scale in models.items():
                views = _view_logits(by_scale[scale], batch.images[scale], task=loaded.task, flip=flip)
                for tta, logits in views.items():
                    chunks[(variant, tta)].append(logits)
            scale_labels.append(batch.labels.cpu())
        for key, parts in chunks.items():
            outputs[key][scale] = torch.cat(parts)
        # Eval loaders read files in order, so every scale's pass lines up sample by sample.
        labels = torch.cat(scale_labels) if labels is None else labels
    assert labels is not None
    return outputs, labels


def evaluate_checkpoint(checkpoint: str | Path, *, options: EvalOptions) -> EvalReport:
    """Evaluate ``checkpoint`` on ``options.split`` at each of ``options.scales`` plus their ensemble."""
    from multiscale_dali.training.distributed import resolve_device
    from multiscale_dali.pipelines.factory import resolve_backend

    device = resolve_device(options.device)
    backend = resolve_backend(options.backend)
    loaded = load_model(checkpoint, device=device)
    scales = check_scales(options.scales or loaded.schedule.all_scales)
    root = resolve_data_root(loaded, options.data)
    splits = load_splits(loaded, root)
    split = splits.split(options.split)
    if not len(split):
        other = next(name for name in EVAL_SPLITS if name != options.split)
        raise ConfigError("split", f"the {options.split} split of {root} is empty; try --split {other}")
    log.info("evaluating %s on the %s split of %s (%d images) at %s px, backend %s on %s", loaded.path,
             options.split, root, len(split), ",".join(map(str, scales)), backend, device)
    models: dict[str, dict[int, nn.Module]] = {AS_TRAINED: {scale: loaded.model for scale in scales}}
    if options.recalibrate_bn:
        models[BN_RECALIBRATED] = _recalibrated_models(loaded, splits.train, scales, options=options, backend=backend)
    logits, labels = _collect_logits(models, split, scales, options=options, loaded=loaded, backend=backend)
    rows = [row for (variant, tta), by_scale in logits.items()
            for row in rows_from_logits(by_scale, labels, task=loaded.task, variant=variant, tta=tta)]
    return EvalReport(
        checkpoint=str(loaded.path), run_dir=str(loaded.run_dir), epoch=loaded.epoch, data=str(root),
        split=options.split, num_samples=int(labels.numel()), task=loaded.task, classes=loaded.classes,
        backend=backend, device=str(device), scales=scales, trained_scales=loaded.schedule.all_scales,
        recalibrate_bn=options.recalibrate_bn, bn_batches=options.bn_batches, rows=tuple(rows),
        best=best_by_variant(rows), tta=options.tta,
    )
