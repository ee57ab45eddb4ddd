"""Soft targets: label smoothing, and the training losses that take probabilities instead of labels.

MixUp, CutMix and label smoothing turn a hard label into a distribution, so the training loss takes
that distribution: class probabilities ``[B, C]`` for a multiclass task, the probability of the
positive class ``[B]`` for a binary one (whose model has a single logit). With a one-hot target and no
smoothing both losses equal :func:`~multiscale_dali.training.losses.base_loss`. Evaluation keeps the
plain loss on the hard labels: the recipe only changes what training is asked to fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multiscale_dali.training.losses import BINARY, BINARY_NUM_CLASSES, MULTICLASS, RESOLVED_TASKS


def check_smoothing(smoothing: float) -> float:
    """``smoothing`` as a float in ``[0, 1)``; ``ValueError`` naming it otherwise."""
    value = float(smoothing)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {smoothing!r}")
    return value


def smooth_targets(labels: torch.Tensor, *, smoothing: float, task: str, num_classes: int) -> torch.Tensor:
    """Hard labels (int ``[B]``) -> float32 soft targets on the labels' device.

    Multiclass: ``[B, C]`` with ``1 - smoothing + smoothing / C`` on the label and ``smoothing / C``
    elsewhere (timm's ``one_hot``/``mixup_target``, torch's ``label_smoothing``), so rows sum to 1.
    Binary: ``[B]``, the label moved toward 0.5: ``y * (1 - smoothing) + smoothing / 2``, the same rule
    with C = 2 read off the positive class.
    """
    smoothing = check_smoothing(smoothing)
    if task not in RESOLVED_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(RESOLVED_TASKS)}")
    labels = labels.view(-1).long()
    if task == BINARY:
        if num_classes != BINARY_NUM_CLASSES:
            raise ValueError(f"a binary task has {BINARY_NUM_CLASSES} classes, got num_classes={num_classes}")
        return labels.float() * (1.0 - smoothing) + smoothing / BINARY_NUM_CLASSES
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c probs[b, c] * log_softmax(logits)[b, c]``.

    ``logits`` and ``probs`` are ``[B, C]``; half-precision logits are upcast (a mean of many terms).
    """
    if logits.ndim != 2 or probs.shape != logits.shape:
        raise ValueError(f"need logits and probabilities of one shape [B, C], got {tuple(logits.shape)} "
                         f"and {tuple(probs.shape)}")
    # cross_entropy takes class probabilities as its target: one fused log-softmax.
    return F.cross_entropy(logits.float(), probs.float())


def bce_with_soft_targets(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of one logit per sample (``[B]`` or ``[B, 1]``) against ``target`` in [0, 1]."""
    if logit.ndim == 2 and logit.shape[1] == 1:
        logit = logit[:, 0]
    if logit.ndim != 1 or target.shape != logit.shape:
        raise ValueError(f"need one logit per sample ([B] or [B, 1]) and a target [B], got {tuple(logit.shape)} "
                         f"and {tuple(target.shape)}")
    return F.binary_cross_entropy_with_logits(logit.float(), target.float())


def soft_base_loss(logits: torch.Tensor, targets: torch.Tensor, *, task: str) -> torch.Tensor:
    """The training loss of one scale: :func:`soft_cross_entropy` or :func:`bce_with_soft_targets`."""
    if task == MULTICLASS:
        return soft_cross_entropy(logits, targets)
    if task == BINARY:
        return bce_with_soft_targets(logits, targets)
    raise ValueError(f"unknown task {task!r}; expected one of {list(RESOLVED_TASKS)}")
