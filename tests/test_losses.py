from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multiscale_dali.constants import CONSISTENCY_TYPES
from multiscale_dali.training.losses import (
    TEACHERS,
    ScaleConsistencyLoss,
    base_loss,
    consistency_divergence,
    ensemble_logits,
    num_outputs,
    predict,
    probabilities,
    resolve_task,
)

TASKS_AND_WIDTHS = [("binary", 1), ("multiclass", 5)]
BATCH = 6
HUGE_LOGIT = 1e4
SCALES = (16, 24, 32)


def _logits(task_width: int, *, seed: int, scale: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, task_width, generator=generator, dtype=torch.float64) * scale


def _labels(task: str, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    high = 2 if task == "binary" else 5
    return torch.randint(0, high, (BATCH,), generator=generator)


def _manual_probs(logits: torch.Tensor, task: str) -> torch.Tensor:
    if task == "binary":
        p = torch.sigmoid(logits[:, 0])
        return torch.stack((1 - p, p), dim=1)
    return torch.softmax(logits, dim=1)


# --- tasks ----------------------------------------------------------------------------------


def test_auto_task_is_binary_for_two_classes_and_multiclass_above():
    assert resolve_task(2) == "binary"
    assert resolve_task(3) == "multiclass"
    assert resolve_task(2, "multiclass") == "multiclass"
    assert resolve_task(7, "multiclass") == "multiclass"


@pytest.mark.parametrize(
    ("num_classes", "task", "named"),
    [(3, "binary", "3"), (2, "regression", "regression"), (1, "auto", "1"), (0, "multiclass", "0")],
)
def test_resolve_task_rejects_bad_combinations_naming_the_value(num_classes, task, named):
    with pytest.raises(ValueError, match=named):
        resolve_task(num_classes, task)


def test_binary_head_has_one_output_and_multiclass_one_per_class():
    assert num_outputs("binary", 2) == 1
    assert num_outputs("auto", 2) == 1
    assert num_outputs("multiclass", 2) == 2
    assert num_outputs("multiclass", 10) == 10


def test_loss_functions_reject_an_unresolved_task():
    with pytest.raises(ValueError, match="auto"):
        base_loss(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), task="auto")


def test_binary_logits_wider_than_one_are_rejected():
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        predict(torch.zeros(2, 3), task="binary")


# --- base loss, predictions, probabilities ------------------------------------------------------


def test_multiclass_base_loss_is_mean_negative_log_likelihood():
    logits, labels = _logits(5, seed=0), _labels("multiclass", seed=1)
    expected = -torch.log_softmax(logits, dim=1)[torch.arange(BATCH), labels].mean()
    assert torch.allclose(base_loss(logits, labels, task="multiclass"), expected)


def test_binary_base_loss_is_mean_bernoulli_negative_log_likelihood():
    logits, labels = _logits(1, seed=0), _labels("binary", seed=1)
    p = torch.sigmoid(logits[:, 0])
    y = labels.double()
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert torch.allclose(base_loss(logits, labels, task="binary"), expected)


def test_base_loss_rejects_batch_size_mismatch():
    with pytest.raises(ValueError, match="batch size"):
        base_loss(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), task="multiclass")


def test_binary_prediction_is_positive_where_logit_is_positive():
    logits = torch.tensor([[-3.0], [0.5], [-0.1], [7.0]])
    predicted = predict(logits, task="binary")
    assert predicted.dtype == torch.int64
    assert predicted.tolist() == [0, 1, 0, 1]


def test_multiclass_prediction_is_argmax():
    logits = _logits(5, seed=3)
    predicted = predict(logits, task="multiclass")
    assert predicted.dtype == torch.int64
    assert torch.equal(predicted, logits.argmax(dim=1))


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_probabilities_are_distributions_over_classes(task, width):
    logits = _logits(width, seed=4)
    probs = probabilities(logits, task=task)
    assert probs.shape == (BATCH, max(width, 2))
    assert torch.allclose(probs.sum(dim=1), torch.ones(BATCH, dtype=probs.dtype))
    assert torch.allclose(probs, _manual_probs(logits, task))
    # The predicted class is the most probable one.
    assert torch.equal(probs.argmax(dim=1), predict(logits, task=task))


# --- divergences ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CONSISTENCY_TYPES)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_divergence_is_zero_for_identical_predictions_and_positive_otherwise(task, width, kind):
    a, b = _logits(width, seed=5), _logits(width, seed=6)
    same = consistency_divergence(a, a.clone(), task=task, kind=kind)
    different = consistency_divergence(a, b, task=task, kind=kind)
    assert same.ndim == 0 and different.ndim == 0
    assert abs(same.item()) < 1e-12
    assert different.item() > 0


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_kl_is_teacher_to_student_summed_over_classes_averaged_over_batch(task, width):
    student, teacher = _logits(width, seed=7), _logits(width, seed=8)
    p_s, p_t = _manual_probs(student, task), _manual_probs(teacher, task)
    expected = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean()
    actual = consistency_divergence(student, teacher, task=task, kind="kl_divergence")
    assert torch.allclose(actual, expected)
    # Direction matters: KL is not symmetric, so swapping roles must change the value.
    swapped = consistency_divergence(teacher, student, task=task, kind="kl_divergence")
    assert not torch.allclose(actual, swapped)


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_js_matches_manual_mixture_formula_and_is_symmetric_and_bounded(task, width):
    student, teacher = _logits(width, seed=9), _logits(width, seed=10)
    p_s, p_t = _manual_probs(student, task), _manual_probs(teacher, task)
    m = 0.5 * (p_s + p_t)
    kl = lambda p, q: (p * (torch.log(p) - torch.log(q))).sum(dim=1).mean()  # noqa: E731
    expected = 0.5 * (kl(p_s, m) + kl(p_t, m))
    actual = consistency_divergence(student, teacher, task=task, kind="js")
    assert torch.allclose(actual, expected)
    assert torch.allclose(actual, consistency_divergence(teacher, student, task=task, kind="js"))
    assert actual.item() <= math.log(2)


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_mse_compares_probabilities_not_logits(task, width):
    student, teacher = _logits(width, seed=11), _logits(width, seed=12)
    expected = F.mse_loss(_manual_probs(student, task), _manual_probs(teacher, task))
    assert torch.allclose(consistency_divergence(student, teacher, task=task, kind="mse"), expected)
    # Shifting all multiclass logits by a constant leaves the distribution, so MSE, unchanged.
    if task == "multiclass":
        shifted = consistency_divergence(student + 3.0, teacher, task=task, kind="mse")
        assert torch.allclose(shifted, expected)


def test_unknown_divergence_kind_is_rejected_by_name():
    with pytest.raises(ValueError, match="'cosine'"):
        consistency_divergence(torch.zeros(2, 3), torch.zeros(2, 3), task="multiclass", kind="cosine")


def test_divergence_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same distributions"):
        consistency_divergence(torch.zeros(2, 3), torch.zeros(2, 4), task="multiclass", kind="mse")


def _extreme_logits(width: int, *, sign: float) -> torch.Tensor:
    # Saturated, confidently wrong predictions: float32 softmax/sigmoid underflows to exact 0 here.
    logits = torch.full((BATCH, width), -HUGE_LOGIT * sign)
    logits[:, 0] = HUGE_LOGIT * sign
    return logits


@pytest.mark.parametrize("kind", CONSISTENCY_TYPES)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_divergence_and_gradients_stay_finite_for_huge_opposite_logits(task, width, kind):
    student = _extreme_logits(width, sign=1.0).requires_grad_(True)
    teacher = _extreme_logits(width, sign=-1.0).requires_grad_(True)
    value = consistency_divergence(student, teacher, task=task, kind=kind)
    value.backward()
    assert torch.isfinite(value)
    assert value.item() > 0
    assert torch.isfinite(student.grad).all() and torch.isfinite(teacher.grad).all()


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_kl_of_saturated_disagreement_is_large_not_infinite(task, width):
    # The exact KL between two saturated, opposite predictions is of the order of the logit gap
    # (HUGE_LOGIT for binary, 2 * HUGE_LOGIT here for multiclass); a naive log(softmax) gives inf.
    value = consistency_divergence(
        _extreme_logits(width, sign=1.0),
        _extreme_logits(width, sign=-1.0),
        task=task,
        kind="kl_divergence",
    )
    assert torch.isfinite(value) and value.item() >= HUGE_LOGIT * 0.99


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_ensemble_logits_give_the_mean_of_the_probabilities(task, width):
    logits = [_logits(width, seed=seed) for seed in (13, 14, 15)]
    expected = torch.stack([_manual_probs(one, task) for one in logits]).mean(dim=0)
    ensembled = ensemble_logits(logits, task=task)
    assert ensembled.shape == logits[0].shape
    assert torch.allclose(probabilities(ensembled, task=task), expected)


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_ensemble_of_saturated_predictions_is_finite(task, width):
    ensembled = ensemble_logits(
        [_extreme_logits(width, sign=1.0), _extreme_logits(width, sign=-1.0)], task=task
    )
    assert torch.isfinite(ensembled).all()


# --- ScaleConsistencyLoss ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"consistency_weight": -0.5}, "-0.5"),
        ({"consistency_weight": float("nan")}, "nan"),
        ({"consistency_type": "kl"}, "'kl'"),
        ({"teacher": "smallest"}, "'smallest'"),
        ({"task": "auto"}, "'auto'"),
    ],
)
def test_loss_rejects_bad_configuration_eagerly_naming_the_value(kwargs, named):
    config = {"task": "multiclass", **kwargs}
    with pytest.raises(ValueError, match=named):
        ScaleConsistencyLoss(**config)


def test_loss_configuration_errors_list_the_allowed_values():
    with pytest.raises(ValueError, match="kl_divergence"):
        ScaleConsistencyLoss(task="binary", consistency_type="kl")
    with pytest.raises(ValueError, match="largest"):
        ScaleConsistencyLoss(task="binary", teacher="smallest")


def _logits_by_scale(width: int, *, seed: int, requires_grad: bool = False) -> dict[int, torch.Tensor]:
    return {
        scale: _logits(width, seed=seed + i).requires_grad_(requires_grad)
        for i, scale in enumerate(SCALES)
    }


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_zero_weight_makes_total_equal_mean_base_loss(task, width, teacher):
    logits, labels = _logits_by_scale(width, seed=20), _labels(task, seed=21)
    total, components = ScaleConsistencyLoss(task=task, teacher=teacher)(logits, labels)
    expected = torch.stack([base_loss(t, labels, task=task) for t in logits.values()]).mean()
    assert torch.allclose(total, expected)
    assert components["consistency"] == 0.0
    assert components["total"] == pytest.approx(components["base"])


@pytest.mark.parametrize("kind", CONSISTENCY_TYPES)
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_consistency_is_zero_when_every_scale_agrees(task, width, teacher, kind):
    shared = _logits(width, seed=22)
    logits = {scale: shared.clone() for scale in SCALES}
    loss = ScaleConsistencyLoss(task=task, consistency_weight=1.0, consistency_type=kind, teacher=teacher)
    total, components = loss(logits, _labels(task, seed=23))
    assert abs(components["consistency"]) < 1e-12
    assert components["total"] == pytest.approx(components["base"])
    assert torch.allclose(total, base_loss(shared, _labels(task, seed=23), task=task))


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_largest_teacher_teaches_every_smaller_scale(task, width):
    logits, labels = _logits_by_scale(width, seed=24), _labels(task, seed=25)
    weight = 0.7
    loss = ScaleConsistencyLoss(task=task, consistency_weight=weight)
    total, components = loss(logits, labels)
    largest = logits[max(SCALES)]
    expected_consistency = torch.stack(
        [
            consistency_divergence(logits[s], largest, task=task, kind="kl_divergence")
            for s in SCALES
            if s != max(SCALES)
        ]
    ).mean()
    assert components["consistency"] == pytest.approx(expected_consistency.item())
    assert components["consistency"] > 0
    assert total.item() == pytest.approx(components["base"] + weight * components["consistency"])
    assert components["total"] == pytest.approx(total.item())


@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_mean_teacher_is_the_ensemble_and_teaches_every_scale(task, width):
    logits, labels = _logits_by_scale(width, seed=26), _labels(task, seed=27)
    loss = ScaleConsistencyLoss(task=task, consistency_weight=1.0, consistency_type="js", teacher="mean")
    _, components = loss(logits, labels)
    teacher = ensemble_logits(list(logits.values()), task=task)
    expected = torch.stack(
        [consistency_divergence(logits[s], teacher, task=task, kind="js") for s in SCALES]
    ).mean()
    assert components["consistency"] == pytest.approx(expected.item())


def test_components_report_every_scale_and_base_is_their_mean():
    logits, labels = _logits_by_scale(5, seed=28), _labels("multiclass", seed=29)
    _, components = ScaleConsistencyLoss(task="multiclass", consistency_weight=0.5)(logits, labels)
    assert set(components) == {"base", "consistency", "total", *(f"base_{s}" for s in SCALES)}
    assert all(isinstance(value, float) for value in components.values())
    per_scale = [components[f"base_{s}"] for s in SCALES]
    assert components["base"] == pytest.approx(sum(per_scale) / len(per_scale))


def test_single_scale_has_no_consistency_term():
    logits, labels = {64: _logits(5, seed=30)}, _labels("multiclass", seed=31)
    total, components = ScaleConsistencyLoss(task="multiclass", consistency_weight=2.0)(logits, labels)
    assert components["consistency"] == 0.0
    assert torch.allclose(total, base_loss(logits[64], labels, task="multiclass"))


def test_empty_scale_mapping_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        ScaleConsistencyLoss(task="multiclass")({}, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("detach", [True, False])
def test_detached_largest_teacher_gets_gradient_only_from_its_own_base_loss(detach):
    logits, labels = _logits_by_scale(5, seed=32, requires_grad=True), _labels("multiclass", seed=33)
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=1.0, detach_teacher=detach)
    loss(logits, labels)[0].backward()
    largest = logits[max(SCALES)]
    own = _logits(5, seed=32 + len(SCALES) - 1).requires_grad_(True)
    (base_loss(own, labels, task="multiclass") / len(SCALES)).backward()
    assert torch.allclose(largest.grad, own.grad) == detach


@pytest.mark.parametrize("kind", CONSISTENCY_TYPES)
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_total_loss_gradients_are_finite_for_huge_logits(task, width, teacher, kind):
    logits = {
        scale: _extreme_logits(width, sign=(-1.0) ** i).requires_grad_(True)
        for i, scale in enumerate(SCALES)
    }
    loss = ScaleConsistencyLoss(
        task=task, consistency_weight=1.0, consistency_type=kind, teacher=teacher, detach_teacher=False
    )
    total, components = loss(logits, _labels(task, seed=34))
    total.backward()
    assert all(math.isfinite(value) for value in components.values())
    assert all(torch.isfinite(t.grad).all() for t in logits.values())


# --- memory-efficient step: one scale at a time -----------------------------------------------


class _SharedNet(nn.Module):
    """Resolution-agnostic and BN-free, so running it per scale changes nothing but memory."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", CONSISTENCY_TYPES)
@pytest.mark.parametrize(("task", "width"), TASKS_AND_WIDTHS)
def test_per_scale_terms_reproduce_forward_value_and_gradients(task, width, kind):
    torch.manual_seed(35)
    model = _SharedNet(width).double()
    images = {s: torch.randn(BATCH, 3, s, s, dtype=torch.float64) for s in SCALES}
    labels = _labels(task, seed=36)
    loss = ScaleConsistencyLoss(task=task, consistency_weight=0.8, consistency_type=kind)

    total, _ = loss({s: model(x) for s, x in images.items()}, labels)
    total.backward()
    expected_grads = _grads(model)
    model.zero_grad()

    # The trainer's order: largest scale first, its logits become the detached teacher.
    summed = 0.0
    teacher = None
    for i, scale in enumerate(sorted(SCALES, reverse=True)):
        logits = model(images[scale])
        term = loss.scale_term(logits, labels, teacher, num_scales=len(SCALES), is_teacher=i == 0)
        term.backward()
        summed += term.item()
        if i == 0:
            teacher = logits.detach()

    assert summed == pytest.approx(total.item())
    for expected, actual in zip(expected_grads, _grads(model)):
        assert torch.allclose(actual, expected)


def test_per_scale_term_of_a_single_scale_is_its_base_loss():
    logits, labels = _logits(5, seed=37), _labels("multiclass", seed=38)
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=1.0)
    term = loss.scale_term(logits, labels, None, num_scales=1, is_teacher=True)
    assert torch.allclose(term, base_loss(logits, labels, task="multiclass"))


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"teacher": "mean"}, "'mean'"), ({"detach_teacher": False}, "False")]
)
def test_per_scale_terms_refuse_configurations_they_cannot_reproduce(kwargs, named):
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=1.0, **kwargs)
    logits, labels = _logits(5, seed=39), _labels("multiclass", seed=40)
    with pytest.raises(ValueError, match=named):
        loss.scale_term(logits, labels, None, num_scales=2, is_teacher=True)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_per_scale_terms_work_for_any_teacher_without_consistency(teacher):
    logits, labels = _logits(5, seed=43), _labels("multiclass", seed=44)
    loss = ScaleConsistencyLoss(task="multiclass", teacher=teacher, detach_teacher=False)
    term = loss.scale_term(logits, labels, None, num_scales=2, is_teacher=False)
    assert torch.allclose(term, base_loss(logits, labels, task="multiclass") / 2)


def test_student_term_needs_the_teacher_target_when_consistency_is_active():
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=1.0)
    logits, labels = _logits(5, seed=41), _labels("multiclass", seed=42)
    with pytest.raises(ValueError, match="teacher_target"):
        loss.scale_term(logits, labels, None, num_scales=2, is_teacher=False)
