"""A step's loss terms come back typed: per-scale base losses keyed by scale, the consistency term
(or none), the total; read to the host in one transfer, whichever way the step ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from multiscale_dali.models.registry import build_model
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.losses import ScaleConsistencyLoss, StepLosses, base_loss, base_weights
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.training.recipe import PreparedBatch
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

SCALES = (8, 12, 16)


def _logits(seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(6, 3, generator=gen) * 3 for s in SCALES}


def _labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 2, 1, 0])


def test_terms_are_keyed_by_scale_and_read_into_the_components_forward_logs():
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=0.7)
    logits, labels = _logits(1), _labels()
    losses = loss.step_losses(logits, labels)
    assert list(losses.base) == sorted(SCALES)
    for scale in SCALES:
        torch.testing.assert_close(losses.base[scale], base_loss(logits[scale], labels, task="multiclass"))
    values = losses.read()
    assert values.base == {s: pytest.approx(losses.base[s].item()) for s in SCALES}
    assert values.total == pytest.approx(values.mean_base + 0.7 * values.consistency)
    total, components = loss(logits, labels)
    assert values.as_components() == components
    assert values.total == pytest.approx(total.item())


def test_a_step_without_consistency_has_no_consistency_term_and_logs_zero():
    losses = ScaleConsistencyLoss(task="multiclass").step_losses(_logits(2), _labels())
    assert losses.consistency is None
    values = losses.read()
    assert values.consistency == 0.0 and values.total == pytest.approx(values.mean_base)


def test_one_scale_at_a_time_shares_add_up_to_the_same_terms():
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=0.7)
    logits, labels = _logits(3), _labels()
    expected = loss.step_losses(logits, labels).read()
    shares, teacher = {}, None
    for scale in sorted(SCALES, reverse=True):
        shares[scale] = loss.scale_share(logits[scale], labels, teacher, num_scales=len(SCALES),
                                         is_teacher=teacher is None)
        teacher = logits[scale] if teacher is None else teacher
    total = torch.stack([share.total for share in shares.values()]).sum()
    got = StepLosses.from_shares(shares, total).read()
    assert got.base == expected.base
    assert got.consistency == pytest.approx(expected.consistency)
    assert got.total == pytest.approx(expected.total)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_memory_efficient_and_one_graph_steps_log_the_same_loss_terms(weight):
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 2, (4,), generator=gen)
    batch = MultiScaleBatch(images={s: torch.randn(4, 3, s, s, generator=gen) for s in SCALES}, labels=labels)
    logged = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        net = build_model("tiny_cnn", num_outputs=1)
        trainer = MultiScaleTrainer(net, loss=ScaleConsistencyLoss(task="binary", consistency_weight=weight),
                                    optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                                    schedule=constant_schedule(SCALES),
                                    options=TrainerOptions(epochs=1, memory_efficient=memory_efficient))
        meter = ScaleMeter()
        trainer.model.train()
        assert trainer._step(batch, meter)
        logged.append(meter.mean_components())
    one_graph, one_scale_at_a_time = logged
    assert set(one_graph) == {"base", "consistency", "total", *(f"base_{s}" for s in SCALES)}
    assert one_scale_at_a_time == pytest.approx(one_graph)


def test_area_weighting_gives_each_scale_its_share_of_pixels():
    weights = base_weights((16, 24, 32), "area")
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[32] / weights[16] == pytest.approx(4.0)
    assert base_weights((16, 24, 32), "equal") == {16: 1 / 3, 24: 1 / 3, 32: 1 / 3}
    with pytest.raises(ValueError, match="unknown scale weighting 'pixels'"):
        ScaleConsistencyLoss(task="multiclass", scale_weighting="pixels")


def test_area_weighted_total_is_the_weighted_sum_of_the_base_losses_in_both_step_forms():
    loss = ScaleConsistencyLoss(task="multiclass", consistency_weight=0.7, scale_weighting="area")
    logits, labels = _logits(5), _labels()
    losses = loss.step_losses(logits, labels)
    weights = base_weights(SCALES, "area")
    expected_base = sum(weights[s] * base_loss(logits[s], labels, task="multiclass") for s in SCALES)
    torch.testing.assert_close(losses.total, expected_base + 0.7 * losses.consistency)
    values = losses.read()  # the logged base term is the optimised one
    assert values.total == pytest.approx(values.mean_base + 0.7 * values.consistency)
    assert values.mean_base == pytest.approx(float(expected_base))
    shares, teacher = {}, None
    for scale in sorted(SCALES, reverse=True):
        shares[scale] = loss.scale_share(logits[scale], labels, teacher, num_scales=len(SCALES),
                                         is_teacher=teacher is None, base_weight=weights[scale])
        teacher = logits[scale] if teacher is None else teacher
    torch.testing.assert_close(torch.stack([share.total for share in shares.values()]).sum(), losses.total)


@pytest.mark.parametrize("chunked", [False, True])
def test_memory_efficient_step_keeps_the_area_weighted_gradients(chunked):
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (4,), generator=gen)
    batch = MultiScaleBatch(images={s: torch.randn(4, 3, s, s, generator=gen) for s in SCALES}, labels=labels)
    grads = []
    for memory_efficient in (False, True):
        torch.manual_seed(0)
        # No BatchNorm: the chunked largest scale is exact too.
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
        trainer = MultiScaleTrainer(
            net, loss=ScaleConsistencyLoss(task="multiclass", consistency_weight=0.5, scale_weighting="area"),
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1), schedule=constant_schedule(SCALES),
            options=TrainerOptions(epochs=1, memory_efficient=memory_efficient))
        if memory_efficient and not chunked:
            trainer._backward = dataclasses.replace(trainer._backward, micro_batch_largest=False)
        trainer.model.train()
        trainer.optimizer.zero_grad()
        trainer._backward(PreparedBatch(batch=batch, targets=labels))
        grads.append([p.grad.clone() for p in net.parameters()])
    for naive, efficient in zip(*grads):
        torch.testing.assert_close(efficient, naive)
