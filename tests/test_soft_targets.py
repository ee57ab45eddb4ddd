"""Label smoothing and the soft-target training losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multiscale_dali.training.losses import base_loss
from multiscale_dali.training.soft_targets import (
    bce_with_soft_targets,
    smooth_targets,
    soft_base_loss,
    soft_cross_entropy,
)

LABELS = torch.tensor([0, 3, 1, 3, 2])


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_multiclass_targets_put_the_smoothed_mass_on_the_label_and_sum_to_one(smoothing):
    targets = smooth_targets(LABELS, smoothing=smoothing, task="multiclass", num_classes=4)
    assert targets.shape == (5, 4) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(5))
    on = targets[torch.arange(5), LABELS]
    torch.testing.assert_close(on, torch.full((5,), 1 - smoothing + smoothing / 4))
    assert torch.equal(targets.argmax(dim=1), LABELS)
    off = targets.clone()
    off[torch.arange(5), LABELS] = smoothing / 4
    torch.testing.assert_close(off, torch.full((5, 4), smoothing / 4))


def test_binary_targets_move_toward_one_half():
    targets = smooth_targets(torch.tensor([0, 1, 1]), smoothing=0.2, task="binary", num_classes=2)
    torch.testing.assert_close(targets, torch.tensor([0.1, 0.9, 0.9]))
    assert torch.equal(smooth_targets(torch.tensor([0, 1]), smoothing=0.0, task="binary", num_classes=2),
                       torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing": 1.0, "task": "multiclass", "num_classes": 4}, "label_smoothing"),
        ({"smoothing": -0.1, "task": "multiclass", "num_classes": 4}, "label_smoothing"),
        ({"smoothing": 0.1, "task": "auto", "num_classes": 4}, "task"),
        ({"smoothing": 0.1, "task": "binary", "num_classes": 3}, "num_classes"),
    ],
)
def test_smoothing_rejects_what_it_cannot_mean(kwargs, match):
    with pytest.raises(ValueError, match=match):
        smooth_targets(LABELS, **kwargs)


def test_soft_cross_entropy_with_hard_or_smoothed_targets_is_torchs_cross_entropy():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    one_hot = smooth_targets(LABELS, smoothing=0.0, task="multiclass", num_classes=4)
    smoothed = smooth_targets(LABELS, smoothing=0.1, task="multiclass", num_classes=4)
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), base_loss(logits, LABELS, task="multiclass"))
    torch.testing.assert_close(soft_cross_entropy(logits, smoothed),
                               F.cross_entropy(logits, LABELS, label_smoothing=0.1))


def test_binary_soft_loss_with_hard_targets_is_the_plain_binary_loss():
    logit = torch.randn(6, 1, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    hard = smooth_targets(labels, smoothing=0.0, task="binary", num_classes=2)
    torch.testing.assert_close(bce_with_soft_targets(logit, hard), base_loss(logit, labels, task="binary"))
    torch.testing.assert_close(soft_base_loss(logit[:, 0], hard, task="binary"),
                               base_loss(logit, labels, task="binary"))


def test_a_soft_target_pulls_the_prediction_toward_itself():
    logits = torch.zeros(1, 3, requires_grad=True)
    soft_cross_entropy(logits, torch.tensor([[0.7, 0.3, 0.0]])).backward()
    # The gradient is softmax - target: negative (grow) where the target exceeds 1/3.
    torch.testing.assert_close(logits.grad, torch.tensor([[1 / 3 - 0.7, 1 / 3 - 0.3, 1 / 3]]))


def test_half_precision_logits_give_a_float32_loss():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    targets = smooth_targets(torch.tensor([0, 1, 2, 0]), smoothing=0.1, task="multiclass", num_classes=3)
    assert soft_cross_entropy(logits, targets).dtype == torch.float32


@pytest.mark.parametrize(
    ("fn", "logits", "targets"),
    [
        (soft_cross_entropy, torch.zeros(4, 3), torch.zeros(4, 2)),
        (soft_cross_entropy, torch.zeros(4), torch.zeros(4)),
        (bce_with_soft_targets, torch.zeros(4, 2), torch.zeros(4)),
        (bce_with_soft_targets, torch.zeros(4, 1), torch.zeros(3)),
    ],
)
def test_mismatched_shapes_are_refused(fn, logits, targets):
    with pytest.raises(ValueError, match="got"):
        fn(logits, targets)


def test_soft_base_loss_needs_a_resolved_task():
    with pytest.raises(ValueError, match="task"):
        soft_base_loss(torch.zeros(2, 3), torch.zeros(2, 3), task="auto")


@pytest.mark.parametrize("task, num_classes", [("multiclass", 5), ("binary", 2)])
def test_the_trainers_base_loss_takes_soft_targets_as_the_soft_loss_does(task, num_classes):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, num_classes if task == "multiclass" else 1, generator=gen)
    labels = torch.randint(0, num_classes, (6,), generator=gen)
    soft = smooth_targets(labels, smoothing=0.3, task=task, num_classes=num_classes)
    mixed = soft.lerp(soft.flip(0), 0.4)
    assert base_loss(logits, mixed, task=task) == pytest.approx(soft_base_loss(logits, mixed, task=task).item())
    one_hot = smooth_targets(labels, smoothing=0.0, task=task, num_classes=num_classes)
    assert base_loss(logits, one_hot, task=task) == pytest.approx(base_loss(logits, labels, task=task).item())
