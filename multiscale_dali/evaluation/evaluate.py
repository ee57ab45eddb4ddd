"""Evaluate a trained checkpoint at several resolutions, and predict single images.

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
it (the "train-test resolution discrepancy" fix of FixRes, Touvron et al. 2019). The statistics are
estimated from the TRAIN split, never from the split being measured, and with the *eval* crop
geometry rather than training augmentation: the statistics must describe what the network sees at
test time, and random-resized crops zoom in (objects look larger) which is exactly the discrepancy
being corrected. Each scale gets its own copy of the model, so one scale's statistics never leak
into another's.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from multiscale_dali.pipelines.batch import MultiScaleBatch, normalize_nhwc_uint8
from multiscale_dali.training.checkpoint import CheckpointError, load_checkpoint
from multiscale_dali.training.config import ConfigError, TrainConfig, check_scales, config_from_mapping
from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.constants import EVAL_CROP_FRACTION, EVAL_FILE
from multiscale_dali.data.discovery import DataError, DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.training.losses import BINARY, base_loss, ensemble_logits, num_outputs, predict, probabilities
from multiscale_dali.models.registry import build_model
from multiscale_dali.training.resume import run_dir_of
from multiscale_dali.pipelines.schedule import ScaleSchedule, constant_schedule

log = logging.getLogger(__name__)

EVAL_SPLITS: tuple[str, ...] = ("test", "val")
AS_TRAINED = "as_trained"
BN_RECALIBRATED = "bn_recalibrated"
ENSEMBLE = "ensemble"
# Up to this many train batches re-estimate BatchNorm statistics (FixRes-style recalibration needs
# a few thousand images at most; more only costs time).
DEFAULT_BN_BATCHES = 50
DEFAULT_EVAL_BATCH_SIZE = 64
# Seed stream of the train subset used for BN recalibration: independent of any training stream.
BN_SUBSET_SEED_OFFSET = 7919


class ImageError(UserError, ValueError, exit_code=EXIT_FAILURE):
    """An image given to :func:`predict_images` that cannot be read; the message names the file."""


# ---------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class LoadedModel:
    """A rebuilt network (eval mode, on its device) and what its checkpoint says about it."""

    model: nn.Module
    path: Path
    config: TrainConfig
    task: str
    classes: tuple[str, ...]
    schedule: ScaleSchedule
    resolved: dict[str, Any]
    epoch: int | None
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of ``best.pt`` or of a training checkpoint (``last.pt``).

    Raises :class:`ConfigError` naming ``--checkpoint`` when the file is missing, unreadable or
    lacks what a rebuild needs.
    """
    path = Path(path)
    try:
        payload = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise ConfigError("checkpoint", str(err)) from None
    # best.pt holds the weights at the top; last.pt nests them in the trainer state.
    state = payload.get("model") if "model" in payload else payload.get("trainer", {}).get("model")
    missing = [key for key in ("config", "classes", "task", "schedule") if key not in payload]
    if state is None or missing:
        raise ConfigError("checkpoint", f"{path} lacks {', '.join(missing) or 'model weights'}: not a run checkpoint")
    config = config_from_mapping(payload["config"], source=f"the checkpoint {path}")
    classes = tuple(payload["classes"])
    task = payload["task"]
    model = build_model(config.model, num_outputs=num_outputs(task, len(classes)), pretrained=False)
    model.load_state_dict(state)
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    model.eval()
    epoch = payload.get("epoch")
    if epoch is None and "trainer" in payload:
        epoch = int(payload["trainer"]["epoch"]) - 1  # the trainer stores the next epoch to run
    return LoadedModel(
        model=model, path=path, config=config, task=task, classes=classes,
        schedule=ScaleSchedule.from_dict(payload["schedule"]), resolved=dict(payload.get("resolved", {})),
        epoch=epoch, device=device,
    )


# ---------------------------------------------------------------------------------------- metrics
def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """Area under the ROC curve from ranks (Mann-Whitney U); tied scores share their mean rank.

    None when only one class is present (the AUC is undefined there).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based rank of a tie group = its last position minus half the group's extra members.
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = mean_ranks[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


@dataclass(frozen=True)
class EvalRow:
    """One line of the evaluation table: one scale, or the ensemble of all scales."""

    variant: str  # AS_TRAINED or BN_RECALIBRATED
    name: str  # "128px" or "ensemble"
    scale: int | None  # None for the ensemble
    accuracy: float
    loss: float
    auc: float | None  # binary tasks only
    num_samples: int


def _row(logits: torch.Tensor, labels: torch.Tensor, *, task: str, variant: str, name: str,
         scale: int | None) -> EvalRow:
    logits = logits.float()
    auc = None
    if task == BINARY:
        # Rank the logit, not the probability: saturated float32 probabilities tie at 1.0.
        auc = roc_auc(logits.view(-1).numpy(), labels.numpy())
    return EvalRow(
        variant=variant, name=name, scale=scale,
        accuracy=float((predict(logits, task=task) == labels).double().mean()),
        loss=float(base_loss(logits, labels, task=task)), auc=auc, num_samples=int(labels.numel()),
    )


def rows_from_logits(logits_by_scale: Mapping[int, torch.Tensor], labels: torch.Tensor, *, task: str,
                     variant: str) -> list[EvalRow]:
    """A row per scale, then the ensemble row (mean of the scales' probabilities)."""
    scales = sorted(logits_by_scale)
    rows = [_row(logits_by_scale[s], labels, task=task, variant=variant, name=f"{s}px", scale=s) for s in scales]
    ensemble = ensemble_logits([logits_by_scale[s] for s in scales], task=task)
    rows.append(_row(ensemble, labels, task=task, variant=variant, name=ENSEMBLE, scale=None))
    return rows


def best_row(rows: Iterable[EvalRow]) -> EvalRow:
    """The single-scale row with the highest accuracy; lower loss breaks ties (as model selection)."""
    singles = [row for row in rows if row.scale is not None]
    return max(singles, key=lambda row: (row.accuracy, -row.loss))


@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    run_dir: str
    epoch: int | None
    data: str
    split: str
    num_samples: int
    task: str
    classes: tuple[str, ...]
    backend: str
    device: str
    scales: tuple[int, ...]
    trained_scales: tuple[int, ...]
    recalibrate_bn: bool
    bn_batches: int
    rows: tuple[EvalRow, ...]
    best: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [asdict(row) for row in self.rows]
        # JSON has no NaN: a diverged model's loss is written as null rather than an invalid file.
        for row in data["rows"]:
            row["loss"] = row["loss"] if math.isfinite(row["loss"]) else None
        return data


def _best_by_variant(rows: Sequence[EvalRow]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(row.variant for row in rows):
        variant_rows = [row for row in rows if row.variant == variant]
        top = best_row(variant_rows)
        ensemble = next(row for row in variant_rows if row.scale is None)
        best[variant] = {"scale": top.scale, "accuracy": top.accuracy, "loss": top.loss,
                         "ensemble_accuracy": ensemble.accuracy}
    return best


# ---------------------------------------------------------------------------------------- BatchNorm
class BatchNormRecalibration:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated from scratch.

    Feed it batches with :meth:`update`, then take the model from :meth:`finish`. The statistics are
    a cumulative average over the batches fed (``momentum=None``), not an exponential one, so every
    batch counts the same. Only the BatchNorm layers run in train mode: dropout or stochastic depth
    in train mode would perturb the activations that later BatchNorm layers measure. The original
    model is never modified.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        self._norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._momenta = [norm.momentum for norm in self._norms]
        if not self._norms:
            log.warning("%s has no BatchNorm layers: BN recalibration changes nothing", type(model).__name__)
        for norm in self._norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        self.batches = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        self.model(images)
        self.batches += 1

    def finish(self) -> nn.Module:
        for norm, momentum in zip(self._norms, self._momenta):
            norm.momentum = momentum  # back to normal, should anyone fine-tune the copy
        return self.model.eval()


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *, max_batches: int) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated from up to ``max_batches`` batches."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    recalibration = BatchNormRecalibration(model)
    for images in batches:
        if recalibration.batches >= max_batches:
            break
        recalibration.update(images)
    return recalibration.finish()


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


def load_splits(loaded: LoadedModel, root: Path) -> DatasetSplits:
    """The run's splits of ``root``: same fractions and seed, so a carved-out split is the same one.

    Files the pre-flight scan finds unreadable are left out with a warning naming them (DALI cannot
    skip a bad file mid-pass); ``num_samples`` in the report shows what was measured.
    """
    from multiscale_dali.training.run import vet_splits

    splits = discover_dataset(root, fractions=loaded.config.split_fractions, seed=loaded.config.seed)
    if splits.classes != loaded.classes:
        raise DataError(
            f"{root} has classes {', '.join(splits.classes)}, the checkpoint was trained on "
            f"{', '.join(loaded.classes)}"
        )
    return vet_splits(splits, loaded.config.replace(on_bad_file="skip"))


def _train_subset(train: SplitFiles, *, count: int, seed: int) -> SplitFiles:
    """A seeded random subset: eval loaders read files in order, and files are sorted by class, so
    the first batches of the unshuffled split would hold one class only and bias the statistics."""
    order = np.random.default_rng(seed + BN_SUBSET_SEED_OFFSET).permutation(len(train))[:count]
    return SplitFiles(files=tuple(train.files[i] for i in order), labels=tuple(train.labels[i] for i in order))


# ---------------------------------------------------------------------------------------- the sweep
@dataclass(frozen=True)
class EvalOptions:
    scales: tuple[int, ...] | None = None  # None: every scale the run trained at
    split: str = "test"
    data: str | None = None  # None: the run's dataset
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE
    workers: int = 2
    recalibrate_bn: bool = False
    bn_batches: int = DEFAULT_BN_BATCHES

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise ConfigError("split", f"{self.split!r} is not one of {', '.join(EVAL_SPLITS)}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.bn_batches < 1:
            raise ConfigError("bn_batches", f"must be >= 1, got {self.bn_batches}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")


def _eval_spec(split: SplitFiles, scales: tuple[int, ...], *, options: EvalOptions, loaded: LoadedModel) -> LoaderSpec:
    return LoaderSpec(
        files=split.files, labels=split.labels, schedule=constant_schedule(scales), batch_size=options.batch_size,
        train=False, device=str(loaded.device), seed=loaded.config.seed, num_workers=options.workers,
        channels_last=loaded.config.channels_last,
    )


def _batches_at(split: SplitFiles, scale: int, *, options: EvalOptions, loaded: LoadedModel,
                backend: str) -> Iterator[MultiScaleBatch]:
    """One pass over ``split`` at one scale with the eval geometry; the loader is closed after it."""
    from multiscale_dali.pipelines.factory import build_loader

    loader = build_loader(_eval_spec(split, (scale,), options=options, loaded=loaded), backend=backend)
    try:
        yield from loader.epoch(0)
    finally:
        loader.close()


def _recalibrated_models(loaded: LoadedModel, train: SplitFiles, scales: tuple[int, ...], *,
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
             len(subset))
    return models


@torch.no_grad()
def _collect_logits(models: Mapping[str, Mapping[int, nn.Module]], split: SplitFiles, scales: tuple[int, ...], *,
                    options: EvalOptions, loaded: LoadedModel, backend: str
                    ) -> tuple[dict[str, dict[int, torch.Tensor]], torch.Tensor]:
    """Logits of every (variant, scale) model over the whole split; one pass per scale."""
    outputs: dict[str, dict[int, torch.Tensor]] = {v: {} for v in models}
    labels: torch.Tensor | None = None
    for scale in scales:
        chunks: dict[str, list[torch.Tensor]] = {v: [] for v in models}
        scale_labels = []
        for batch in _batches_at(split, scale, options=options, loaded=loaded, backend=backend):
            for variant, by_scale in models.items():
                chunks[variant].append(by_scale[scale](batch.images[scale]).float().cpu())
            scale_labels.append(batch.labels.cpu())
        for variant, parts in chunks.items():
            outputs[variant][scale] = torch.cat(parts)
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
    rows = [row for variant in models for row in rows_from_logits(logits[variant], labels, task=loaded.task,
                                                                  variant=variant)]
    return EvalReport(
        checkpoint=str(loaded.path), run_dir=str(loaded.run_dir), epoch=loaded.epoch, data=str(root),
        split=options.split, num_samples=int(labels.numel()), task=loaded.task, classes=loaded.classes,
        backend=backend, device=str(device), scales=scales, trained_scales=loaded.schedule.all_scales,
        recalibrate_bn=options.recalibrate_bn, bn_batches=options.bn_batches, rows=tuple(rows),
        best=_best_by_variant(rows),
    )


def format_report(report: EvalReport) -> list[str]:
    """The report as table lines: one row per scale and the ensemble, a column group per variant."""
    variants = list(dict.fromkeys(row.variant for row in report.rows))
    by_key = {(row.variant, row.name): row for row in report.rows}
    names = list(dict.fromkeys(row.name for row in report.rows))
    binary = report.task == BINARY
    group = f"{'accuracy':>9} {'loss':>8}" + (f" {'AUC':>6}" if binary else "")
    lines = [f"{'':<10}" + " | ".join(f"{v.replace('_', ' '):^{len(group)}}" for v in variants),
             f"{'scale':<10}" + " | ".join(group for _ in variants)]
    for name in names:
        cells = []
        for variant in variants:
            row = by_key[(variant, name)]
            cell = f"{row.accuracy:>9.1%} {row.loss:>8.4f}"
            if binary:
                cell += f" {'-' if row.auc is None else format(row.auc, '.3f'):>6}"
            cells.append(cell)
        lines.append(f"{name:<10}" + " | ".join(cells))
    for variant in variants:
        best = report.best[variant]
        lines.append(f"best resolution ({variant.replace('_', ' ')}): {best['scale']}px, accuracy "
                     f"{best['accuracy']:.1%} (ensemble of {len(report.scales)} scales: "
                     f"{best['ensemble_accuracy']:.1%})")
    return lines


def default_eval_path(checkpoint: str | Path) -> Path:
    """``RUN_DIR/eval.json`` for ``RUN_DIR/best.pt`` and for ``RUN_DIR/checkpoints/last.pt``."""
    return run_dir_of(checkpoint) / EVAL_FILE


# ---------------------------------------------------------------------------------------- predict
def preprocess_image(path: str | Path, *, scales: Sequence[int], eval_crop_fraction: float = EVAL_CROP_FRACTION,
                     channels_last: bool = True) -> dict[int, torch.Tensor]:
    """Normalised float ``[1, 3, s, s]`` per scale, as a single-scale eval batch of the pipelines.

    Centre crop, then each scale resized from the crop (as :func:`evaluate_checkpoint` measures it).
    """
    from multiscale_dali.pipelines.sampling import eval_crop_box
    from multiscale_dali.pipelines.torchvision_backend import load_rgb, resize_square

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        image = load_rgb(str(path))
    except RuntimeError as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    top, left, side = eval_crop_box(image.shape[-2], image.shape[-1], eval_crop_fraction)
    crop = image[:, top : top + side, left : left + side]
    return {s: normalize_nhwc_uint8(resize_square(crop, s).permute(1, 2, 0).unsqueeze(0), channels_last=channels_last)
            for s in sorted(scales)}


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str  # class name
    index: int
    probability: float  # of the predicted class
    probabilities: tuple[float, ...]  # per class, in checkpoint class order


@torch.no_grad()
def predict_images(loaded: LoadedModel, paths: Sequence[str | Path], *, scales: Sequence[int],
                   batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> list[Prediction]:
    """Class and probability per image; several scales predict the mean of their probabilities.

    Every image is read before the model runs, so a bad path fails fast with :class:`ImageError`.
    """
    scales = check_scales(scales)
    inputs = [preprocess_image(p, scales=scales, channels_last=loaded.config.channels_last) for p in paths]
    predictions: list[Prediction] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        per_scale = [probabilities(loaded.model(torch.cat([x[s] for x in chunk]).to(loaded.device)).float(),
                                   task=loaded.task) for s in scales]
        mean = torch.stack(per_scale).mean(dim=0).cpu()
        for offset, probs in enumerate(mean):
            index = int(probs.argmax())
            predictions.append(Prediction(path=str(paths[start + offset]), label=loaded.classes[index], index=index,
                                          probability=float(probs[index]), probabilities=tuple(probs.tolist())))
    return predictions


def default_predict_scales(loaded: LoadedModel) -> tuple[int, ...]:
    """The scale the model was selected at: the largest of the schedule's final stage."""
    return (max(loaded.schedule.final_scales),)
