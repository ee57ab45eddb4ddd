"""The evaluation table: a row per (variant, scale) and the ensemble, ROC-AUC, the report and its text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from multiscale_dali.constants import EVAL_FILE, Task, Tta
from multiscale_dali.training.losses import base_loss, ensemble_logits, predict
from multiscale_dali.training.resume import run_dir_of

# Variants: the weights as trained, and a copy with BatchNorm statistics re-estimated per scale.
AS_TRAINED = "as_trained"
BN_RECALIBRATED = "bn_recalibrated"
ENSEMBLE = "ensemble"
# Row names of test-time-augmented rows carry this after the scale (``128px+flip``, ``ensemble+flip``).
TTA_SEPARATOR = "+"


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
    tta: str = Tta.NONE.value  # "flip": the mean of the image's and its mirror's probabilities


def _row(logits: torch.Tensor, labels: torch.Tensor, *, task: str, variant: str, name: str,
         scale: int | None, tta: str) -> EvalRow:
    logits = logits.float()
    auc = None
    if task == Task.BINARY:
        # Rank the logit, not the probability: saturated float32 probabilities tie at 1.0.
        auc = roc_auc(logits.view(-1).numpy(), labels.numpy())
    return EvalRow(
        variant=variant, name=name, scale=scale,
        accuracy=float((predict(logits, task=task) == labels).double().mean()),
        loss=float(base_loss(logits, labels, task=task)), auc=auc, num_samples=int(labels.numel()), tta=tta,
    )


def row_name(scale: int | None, tta: str = Tta.NONE.value) -> str:
    """``128px``, ``ensemble``; test-time-augmented rows add the augmentation: ``128px+flip``."""
    name = ENSEMBLE if scale is None else f"{scale}px"
    return name if tta == Tta.NONE else f"{name}{TTA_SEPARATOR}{tta}"


def rows_from_logits(logits_by_scale: Mapping[int, torch.Tensor], labels: torch.Tensor, *, task: str,
                     variant: str, tta: str = Tta.NONE.value) -> list[EvalRow]:
    """A row per scale, then the ensemble row (mean of the scales' probabilities).

    ``tta``: what the logits already are (flip: ``log`` of the mean probability over the two views,
    so the ensemble of them is the plain mean of all 2 x scales predictions).
    """
    scales = sorted(logits_by_scale)
    rows = [_row(logits_by_scale[s], labels, task=task, variant=variant, name=row_name(s, tta), scale=s, tta=tta)
            for s in scales]
    ensemble = ensemble_logits([logits_by_scale[s] for s in scales], task=task)
    rows.append(_row(ensemble, labels, task=task, variant=variant, name=row_name(None, tta), scale=None, tta=tta))
    return rows


def best_row(rows: Iterable[EvalRow]) -> EvalRow:
    """The single-scale row with the highest accuracy; lower loss breaks ties (as model selection)."""
    singles = [row for row in rows if row.scale is not None]
    return max(singles, key=lambda row: (row.accuracy, -row.loss))


def best_key(variant: str, tta: str) -> str:
    """Key of :func:`best_by_variant`: the variant, with ``+flip`` for its test-time-augmented rows."""
    return variant if tta == Tta.NONE else f"{variant}{TTA_SEPARATOR}{tta}"


def best_by_variant(rows: Sequence[EvalRow]) -> dict[str, dict[str, Any]]:
    """Per variant (and per variant with TTA, ``as_trained+flip``): the best single scale, its accuracy
    and loss, and the ensemble's accuracy."""
    best: dict[str, dict[str, Any]] = {}
    for variant, tta in dict.fromkeys((row.variant, row.tta) for row in rows):
        variant_rows = [row for row in rows if row.variant == variant and row.tta == tta]
        top = best_row(variant_rows)
        ensemble = next(row for row in variant_rows if row.scale is None)
        best[best_key(variant, tta)] = {"scale": top.scale, "accuracy": top.accuracy, "loss": top.loss,
                         "ensemble_accuracy": ensemble.accuracy}
    return best


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
    tta: str = Tta.NONE.value

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [asdict(row) for row in self.rows]
        # JSON has no NaN: a diverged model's loss is written as null rather than an invalid file.
        for row in data["rows"]:
            row["loss"] = row["loss"] if math.isfinite(row["loss"]) else None
        return data


def format_report(report: EvalReport) -> list[str]:
    """The report as table lines: one row per scale and the ensemble, a column group per variant."""
    variants = list(dict.fromkeys(row.variant for row in report.rows))
    by_key = {(row.variant, row.name): row for row in report.rows}
    names = list(dict.fromkeys(row.name for row in report.rows))
    binary = report.task == Task.BINARY
    group = f"{'accuracy':>9} {'loss':>8}" + (f" {'AUC':>6}" if binary else "")
    width = max(10, *(len(name) + 1 for name in names))  # "ensemble+flip" is wider than "128px"
    lines = [f"{'':<{width}}" + " | ".join(f"{v.replace('_', ' '):^{len(group)}}" for v in variants),
             f"{'scale':<{width}}" + " | ".join(group for _ in variants)]
    for name in names:
        cells = []
        for variant in variants:
            row = by_key[(variant, name)]
            cell = f"{row.accuracy:>9.1%} {row.loss:>8.4f}"
            if binary:
                cell += f" {'-' if row.auc is None else format(row.auc, '.3f'):>6}"
            cells.append(cell)
        lines.append(f"{name:<{width}}" + " | ".join(cells))
    for key, best in report.best.items():
        lines.append(f"best resolution ({key.replace('_', ' ')}): {best['scale']}px, accuracy "
                     f"{best['accuracy']:.1%} (ensemble of {len(report.scales)} scales: "
                     f"{best['ensemble_accuracy']:.1%})")
    return lines


def default_eval_path(checkpoint: str | Path) -> Path:
    """``RUN_DIR/eval.json`` for ``RUN_DIR/best.pt`` and for ``RUN_DIR/checkpoints/last.pt``."""
    return run_dir_of(checkpoint) / EVAL_FILE
