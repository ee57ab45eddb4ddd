"""Task resolution, base losses and the scale-consistency objective of a multi-scale step.

Every step runs the model on several resolutions of the same crop. The objective is

    total = sum_s w_s base(logits_s, labels) + weight * mean_{s in students} D(student_s || teacher)

where ``base`` is cross-entropy (multiclass) or BCE-with-logits on a single logit (binary), and
``D`` is one of :data:`~multiscale_dali.constants.CONSISTENCY_TYPES`. The teacher is an explicit
choice (see :data:`TEACHERS`): the largest scale's prediction, or the ensemble mean of every scale's
probabilities. The base weights ``w_s`` sum to 1: equal (``1/S``), or in proportion to each scale's
pixels (``area``, the default of a run: see :func:`base_weights`).

Divergences are computed from log-probabilities (``log_softmax`` / ``logsigmoid``), never from
``log(softmax(...))``: with logits around 1e4 the probabilities underflow to exactly 0 and the naive
log gives ``-inf`` and NaN gradients, while the log-space forms stay finite. A binary task is treated
as a two-class Bernoulli distribution ``[1 - p, p]`` so that every divergence has one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from multiscale_dali.errors import ConfigError
from multiscale_dali.constants import CONSISTENCY_TYPES, SCALE_WEIGHTINGS, TASKS, TEACHERS, ScaleWeighting

BINARY = "binary"
MULTICLASS = "multiclass"
# The tasks a loss can run on; "auto" only exists before resolve_task().
RESOLVED_TASKS: tuple[str, ...] = (BINARY, MULTICLASS)
BINARY_NUM_CLASSES = 2
# A binary model has one output: the logit of the positive class.
BINARY_NUM_OUTPUTS = 1

TEACHER_LARGEST = "largest"
TEACHER_MEAN = "mean"

# Floor on the Jensen-Shannon mixture before its log: where both distributions put ~0 mass the
# mixture underflows to 0 and log(0) would poison the sum with -inf * 0 = NaN.
JS_MIXTURE_FLOOR = 1e-7


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def resolve_task(num_classes: int, task: str = "auto") -> str:
    """``"auto"`` -> ``"binary"`` for 2 classes, ``"multiclass"`` otherwise; validate explicit tasks."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < BINARY_NUM_CLASSES:
        raise ValueError(
            f"num_classes must be at least {BINARY_NUM_CLASSES} to classify anything, got {num_classes}"
        )
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if task == "auto":
        return BINARY if num_classes == BINARY_NUM_CLASSES else MULTICLASS
    if task == BINARY and num_classes != BINARY_NUM_CLASSES:
        # A ConfigError (a ValueError): the data is fine, the flag does not fit it.
        raise ConfigError(
            "task", f"'binary' needs exactly {BINARY_NUM_CLASSES} classes, got num_classes={num_classes}; "
            "use --task multiclass or auto"
        )
    return task


def num_outputs(task: str, num_classes: int) -> int:
    """Width of the model's head: 1 logit for a binary task, one per class otherwise."""
    resolved = resolve_task(num_classes, task)
    return BINARY_NUM_OUTPUTS if resolved == BINARY else num_classes


def _check_task(task: str) -> str:
    if task not in RESOLVED_TASKS:
        raise ValueError(
            f"unknown task {task!r}; expected one of {list(RESOLVED_TASKS)} (call resolve_task() first)"
        )
    return task


def _binary_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` or ``[B]`` -> ``[B]``; anything wider is a head/task mismatch, not a batch to squeeze."""
    if logits.ndim == 2 and logits.shape[1] == BINARY_NUM_OUTPUTS:
        return logits[:, 0]
    if logits.ndim == 1:
        return logits
    raise ValueError(
        f"binary logits must be shaped [B, 1] or [B], got {tuple(logits.shape)} "
        "(a model built for the multiclass task?)"
    )


def _multiclass_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2 or logits.shape[1] < BINARY_NUM_CLASSES:
        raise ValueError(
            f"multiclass logits must be shaped [B, C] with C >= {BINARY_NUM_CLASSES}, "
            f"got {tuple(logits.shape)}"
        )
    return logits


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # Half-precision logits (autocast) are upcast: logsigmoid(-1e4) = -1e4 is out of float16's
    # range, and divergences sum many small terms. float64 stays float64.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _log_probs(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class log-probabilities ``[B, C]`` (C = 2 for binary: ``[log(1 - p), log p]``)."""
    if _check_task(task) == BINARY:
        z = _at_least_float32(_binary_logits(logits))
        return torch.stack((F.logsigmoid(-z), F.logsigmoid(z)), dim=1)
    return F.log_softmax(_at_least_float32(_multiclass_logits(logits)), dim=1)


# ---------------------------------------------------------------------------------------------
# Per-scale quantities
# ---------------------------------------------------------------------------------------------


def base_loss(logits: torch.Tensor, labels: torch.Tensor, *, task: str) -> torch.Tensor:
    """Mean cross-entropy (multiclass) or BCE-with-logits on the positive logit (binary).

    ``labels``: int64 class indices ``[B]``, or soft targets as float (the training recipe's MixUp,
    CutMix and label smoothing, see ``soft_targets.py``): class probabilities ``[B, C]`` for a
    multiclass task, the positive class's probability ``[B]`` for a binary one. With one-hot soft
    targets the loss equals the hard-label one.
    """
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"logits have batch size {logits.shape[0]} but labels have {labels.shape[0]}"
        )
    # Upcast half-precision logits: a loss is a mean of many terms, which bfloat16 sums poorly.
    logits = _at_least_float32(logits)
    if _check_task(task) == BINARY:
        z = _binary_logits(logits)
        return F.binary_cross_entropy_with_logits(z, labels.to(z.dtype).view(-1))
    if labels.is_floating_point():  # probabilities [B, C]: cross_entropy takes them as its target
        return F.cross_entropy(_multiclass_logits(logits), labels.to(logits.dtype))
    return F.cross_entropy(_multiclass_logits(logits), labels.long().view(-1))


def predict(logits: torch.Tensor, *, task: str) -> torch.Tensor:
    """Predicted class indices, int64 ``[B]`` (binary: positive where the logit is > 0)."""
    if _check_task(task) == BINARY:
        return (_binary_logits(logits) > 0).long()
    return _multiclass_logits(logits).argmax(dim=1)


def probabilities(logits: torch.Tensor, *, task: str) -> torch.Tensor:
    """Class probabilities ``[B, C]``; binary gives ``[1 - p, p]`` with C = 2."""
    if _check_task(task) == BINARY:
        z = _binary_logits(logits)
        # sigmoid(-z) rather than 1 - sigmoid(z): keeps tiny negative-class probabilities exact.
        return torch.stack((torch.sigmoid(-z), torch.sigmoid(z)), dim=1)
    return torch.softmax(_multiclass_logits(logits), dim=1)


def ensemble_logits(logits: Sequence[torch.Tensor], *, task: str) -> torch.Tensor:
    """Logits whose probabilities are the mean of the given predictions' probabilities.

    This is the ``"mean"`` teacher, and also the multi-scale ensemble prediction at evaluation.
    Multiclass returns ``log(mean p)`` ``[B, C]`` (softmax of it is ``mean p``); binary returns
    ``logit(mean p)`` ``[B, 1]``. Averaging happens in log space (``logsumexp``) so that
    saturated predictions do not underflow.
    """
    _check_task(task)
    if not logits:
        raise ValueError("ensemble_logits needs at least one prediction")
    log_p = torch.stack([_log_probs(one, task) for one in logits])  # [S, B, C]
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    if task == BINARY:
        # logit(p) = log p - log(1 - p), both already in log space.
        return (log_mean[:, 1] - log_mean[:, 0]).unsqueeze(1)
    return log_mean


def consistency_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, task: str, kind: str
) -> torch.Tensor:
    """Scalar divergence between a student's and a teacher's predicted distributions.

    * ``"kl_divergence"``: KL(teacher || student), summed over classes, averaged over the batch
      (``batchmean``, the true KL; ``reduction="mean"`` would also divide by the class count);
    * ``"js"``: Jensen-Shannon, ``(KL(s || m) + KL(t || m)) / 2`` with ``m`` floored at
      :data:`JS_MIXTURE_FLOOR`, batchmean;
    * ``"mse"``: mean squared difference of the probabilities over batch and classes.

    Gradients flow into ``teacher_logits`` too unless the caller detaches them.
    """
    if kind not in CONSISTENCY_TYPES:
        raise ValueError(f"unknown consistency type {kind!r}; expected one of {list(CONSISTENCY_TYPES)}")
    student_log_p = _log_probs(student_logits, task)
    teacher_log_p = _log_probs(teacher_logits, task)
    if student_log_p.shape != teacher_log_p.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} do not describe the same distributions"
        )
    if kind == "kl_divergence":
        # kl_div(input, target) = sum target * (log target - input): input is the student.
        return F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    if kind == "js":
        mixture = 0.5 * (student_log_p.exp() + teacher_log_p.exp())
        log_mixture = mixture.clamp_min(JS_MIXTURE_FLOOR).log()
        kl_student = F.kl_div(log_mixture, student_log_p, reduction="batchmean", log_target=True)
        kl_teacher = F.kl_div(log_mixture, teacher_log_p, reduction="batchmean", log_target=True)
        return 0.5 * (kl_student + kl_teacher)
    return F.mse_loss(student_log_p.exp(), teacher_log_p.exp())


# ---------------------------------------------------------------------------------------------
# The multi-scale objective
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossValues:
    """One step's loss terms as Python floats, for logging and the finiteness check."""

    base: dict[int, float]  # mean base loss per scale
    mean_base: float  # their mean weighted by the scales' shares: the objective's base term
    consistency: float  # 0.0 when the step had no consistency term
    total: float

    def as_components(self) -> dict[str, float]:
        """The flat names ``metrics.jsonl`` and checkpoints use: base, consistency, total, base_<scale>."""
        components = {"base": self.mean_base, "consistency": self.consistency, "total": self.total}
        components.update({f"base_{scale}": value for scale, value in self.base.items()})
        return components


def base_weights(scales: Sequence[int], weighting: str = ScaleWeighting.EQUAL) -> dict[int, float]:
    """Each scale's share of the base loss, summing to 1.

    ``equal``: ``1/S``. ``area``: in proportion to ``scale**2``, the pixels of a sample there. Why
    area: with equal shares, two of three scales below the top one pull the shared weights towards the
    small resolutions, and on held-out digits the top scale lost 5 points against single-scale
    training; weighting by area gives the top scale the largest share (0.55 for 16/24/32 or 64/96/128)
    without a tuned constant (docs/results.md).
    """
    if weighting not in SCALE_WEIGHTINGS:
        raise ValueError(f"unknown scale weighting {weighting!r}; expected one of {list(SCALE_WEIGHTINGS)}")
    if not scales:
        raise ValueError("base_weights needs at least one scale")
    raw = {s: 1.0 if weighting == ScaleWeighting.EQUAL else float(s) ** 2 for s in scales}
    total = sum(raw.values())
    return {s: value / total for s, value in raw.items()}


def weighted_base(base: Mapping[int, torch.Tensor], weights: Mapping[int, float]) -> torch.Tensor:
    """The objective's base term: the per-scale base losses summed with the scales' shares."""
    return torch.stack([weights[s] * loss for s, loss in base.items()]).sum()


@dataclass(frozen=True)
class StepLosses:
    """One step's objective and its terms, on the device: reading them is a device sync (see :meth:`read`)."""

    base: Mapping[int, torch.Tensor]  # mean base loss per scale, in ascending scale order
    consistency: torch.Tensor | None  # None: no consistency term (one scale, or weight 0)
    total: torch.Tensor  # what the step backpropagates (attached in a one-graph step)
    weights: Mapping[int, float] | None = None  # each scale's share of the base term; None: equal

    @classmethod
    def from_shares(cls, shares: Mapping[int, "ScaleShare"], total: torch.Tensor,
                    weights: Mapping[int, float] | None = None) -> "StepLosses":
        """The terms of a step run one scale at a time; ``total``: the sum of the shares' totals."""
        scales = sorted(shares)
        divergences = [shares[s].divergence for s in scales if shares[s].divergence is not None]
        return cls(base={s: shares[s].base.detach() for s in scales},
                   consistency=torch.stack([d.detach() for d in divergences]).mean() if divergences else None,
                   total=total, weights=weights)

    def read(self) -> LossValues:
        """Every number in one device->host transfer instead of one sync per ``.item()``.

        float32 rather than float64 because some backends (MPS) have no float64.
        """
        scales = list(self.base)
        per_scale = [self.base[s] for s in scales]
        mean_base = torch.stack(per_scale).mean() if self.weights is None else weighted_base(self.base, self.weights)
        consistency = mean_base.new_zeros(()) if self.consistency is None else self.consistency
        logged = torch.stack([t.detach().float() for t in (mean_base, consistency, self.total, *per_scale)]).tolist()
        return LossValues(base=dict(zip(scales, logged[3:])), mean_base=logged[0], consistency=logged[1],
                          total=logged[2])


@dataclass(frozen=True)
class ScaleShare:
    """One scale's share of the objective, for a step that holds one scale's graph at a time."""

    base: torch.Tensor  # the scale's mean base loss
    divergence: torch.Tensor | None  # D(scale || teacher); None for the teacher itself or without consistency
    total: torch.Tensor  # w_s * base, plus w / (S - 1) * divergence for a student: what to backpropagate


class ScaleConsistencyLoss(torch.nn.Module):
    """Base loss over scales (shares from ``scale_weighting``, see :func:`base_weights`) plus a
    weighted scale-consistency term.

    ``teacher="largest"``: the largest scale's prediction teaches every smaller scale (the largest
    is not its own student). ``teacher="mean"``: the ensemble of all scales' probabilities (see
    :func:`ensemble_logits`) teaches every scale. ``detach_teacher`` stops gradients through the
    teacher, the usual self-distillation choice: otherwise the teacher is also pulled towards its
    students.
    """

    def __init__(
        self,
        *,
        task: str,
        consistency_weight: float = 0.0,
        consistency_type: str = "kl_divergence",
        teacher: str = TEACHER_LARGEST,
        detach_teacher: bool = True,
        scale_weighting: str = ScaleWeighting.EQUAL,
    ) -> None:
        super().__init__()
        # Validate eagerly: a typo in a config should fail at construction, not at step 1 of a run.
        self.task = _check_task(task)
        weight = float(consistency_weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"consistency_weight must be a finite number >= 0, got {consistency_weight!r}"
            )
        if consistency_type not in CONSISTENCY_TYPES:
            raise ValueError(
                f"unknown consistency_type {consistency_type!r}; expected one of {list(CONSISTENCY_TYPES)}"
            )
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}; expected one of {list(TEACHERS)}")
        self.consistency_weight = weight
        self.consistency_type = consistency_type
        self.teacher = teacher
        self.detach_teacher = bool(detach_teacher)
        base_weights([1], scale_weighting)  # refuses an unknown weighting now, not at step 1
        self.scale_weighting = scale_weighting

    def base_weights(self, scales: Sequence[int]) -> dict[int, float]:
        """Each scale's share of the base loss in a step over ``scales``."""
        return base_weights(scales, self.scale_weighting)

    def extra_repr(self) -> str:
        return (
            f"task={self.task!r}, consistency_weight={self.consistency_weight}, "
            f"consistency_type={self.consistency_type!r}, teacher={self.teacher!r}, "
            f"detach_teacher={self.detach_teacher}, scale_weighting={self.scale_weighting!r}"
        )

    def _consistency_active(self, num_scales: int) -> bool:
        # Nothing to be consistent with at one scale; at weight 0 skip the work entirely.
        return self.consistency_weight > 0 and num_scales > 1

    def _divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return consistency_divergence(student, teacher, task=self.task, kind=self.consistency_type)

    def step_losses(self, logits_by_scale: Mapping[int, torch.Tensor],
                    labels: torch.Tensor | Mapping[int, torch.Tensor]) -> StepLosses:
        """The step's objective and its terms, on the device (no host sync); ``total`` keeps its graph.

        ``labels``: one target for every scale, or one per scale (MixUp/CutMix soft targets, whose
        weights depend on the box pasted at each resolution); see :func:`base_loss`.
        """
        if not logits_by_scale:
            raise ValueError("logits_by_scale is empty: at least one scale is required")
        scales = sorted(logits_by_scale)
        per_scale = [base_loss(logits_by_scale[s], labels[s] if isinstance(labels, Mapping) else labels,
                               task=self.task) for s in scales]
        weights = self.base_weights(scales)
        by_scale = dict(zip(scales, per_scale))
        base = weighted_base(by_scale, weights)
        if not self._consistency_active(len(scales)):
            return StepLosses(base=by_scale, consistency=None, total=base, weights=weights)
        if self.teacher == TEACHER_LARGEST:
            teacher_logits = logits_by_scale[scales[-1]]
            students = scales[:-1]
        else:
            teacher_logits = ensemble_logits([logits_by_scale[s] for s in scales], task=self.task)
            students = scales
        if self.detach_teacher:
            teacher_logits = teacher_logits.detach()
        consistency = torch.stack([self._divergence(logits_by_scale[s], teacher_logits) for s in students]).mean()
        return StepLosses(base=by_scale, consistency=consistency,
                          total=base + self.consistency_weight * consistency, weights=weights)

    def forward(
        self, logits_by_scale: Mapping[int, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(total, components)``; components hold ``base``, ``base_<scale>``,
        ``consistency`` and ``total`` as floats for logging (one host read, see :meth:`StepLosses.read`)."""
        losses = self.step_losses(logits_by_scale, labels)
        return losses.total, losses.read().as_components()

    def scale_share(
        self,
        scale_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_target: torch.Tensor | None,
        *,
        num_scales: int,
        is_teacher: bool,
        base_weight: float | None = None,
    ) -> ScaleShare:
        """One scale's share of :meth:`forward`'s total, for a step that holds one scale's graph at a time.

        With ``S = num_scales``, ``w_s = base_weight`` (the scale's entry of :meth:`base_weights`;
        ``None``: ``1/S``) and ``w`` the consistency weight, the term is::

            teacher (largest) scale:  w_s * base_s
            every other scale:        w_s * base_s + w / (S - 1) * D(scale || teacher_target)

        ``teacher_target`` (the largest scale's logits; ignored, may be ``None``, for the teacher
        itself) is detached here, so each term's graph ends at its own scale. The terms therefore
        totals sum to ``forward(...)[0]``, and backpropagating each one separately accumulates exactly
        the gradients of ``forward()`` with ``teacher="largest"`` and ``detach_teacher=True``,
        while only one scale's activations are alive at a time. A trainer runs the largest scale
        first::

            teacher = None
            for i, scale in enumerate(sorted(images, reverse=True)):
                logits = model(images[scale])
                loss.scale_share(logits, labels, teacher, num_scales=S, is_teacher=i == 0).total.backward()
                if i == 0:
                    teacher = logits.detach()

        With consistency active (weight > 0, several scales) any other configuration raises: a
        ``"mean"`` teacher needs every scale's logits before the first term, and an attached
        teacher needs the teacher's graph kept alive. At weight 0 every configuration works.
        """
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        base = base_loss(scale_logits, labels, task=self.task)
        term = base / num_scales if base_weight is None else base * base_weight
        if not self._consistency_active(num_scales):
            # Without a consistency term the objective is separable whatever the teacher setting.
            return ScaleShare(base=base, divergence=None, total=term)
        if self.teacher != TEACHER_LARGEST or not self.detach_teacher:
            raise ValueError(
                "one scale at a time reproduces forward() only with teacher='largest' and detach_teacher=True "
                f"when consistency is active, got teacher={self.teacher!r}, "
                f"detach_teacher={self.detach_teacher} (consistency_weight={self.consistency_weight})"
            )
        if is_teacher:
            return ScaleShare(base=base, divergence=None, total=term)
        if teacher_target is None:
            raise ValueError(
                "teacher_target is required for a non-teacher scale when consistency is active "
                f"(consistency_weight={self.consistency_weight}, num_scales={num_scales})"
            )
        num_students = num_scales - 1
        divergence = self._divergence(scale_logits, teacher_target.detach())
        return ScaleShare(base=base, divergence=divergence,
                          total=term + (self.consistency_weight / num_students) * divergence)

    def scale_term(
        self,
        scale_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_target: torch.Tensor | None,
        *,
        num_scales: int,
        is_teacher: bool,
        base_weight: float | None = None,
    ) -> torch.Tensor:
        """The ``total`` of :meth:`scale_share`: one scale's share of :meth:`forward`'s total."""
        return self.scale_share(scale_logits, labels, teacher_target, num_scales=num_scales,
                                is_teacher=is_teacher, base_weight=base_weight).total
