"""Checkpoints written before the trainer owned its state still load, resume, and are written again
in the same format.

``data/trainer_state_v1.pt`` was written by the trainer of commit 679a808 (before this refactor), from
the scenario below: a tiny BatchNorm network trained on ``_batches()`` and interrupted after
``STOP_AFTER`` steps, in the middle of epoch 1. For the float32 run it also holds what that code did
next: resumed from the state (best weights handed back as the run did), trained to the end, the final
and the best weights. Regenerate only if the checkpoint format changes on purpose; the builders below
use no API younger than that commit, so that code can run them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.losses import ScaleConsistencyLoss
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

FIXTURE = Path(__file__).resolve().parent / "data" / "trainer_state_v1.pt"
SCALES = (16, 24)
EPOCHS = 3
STEPS = 6  # batches per epoch
STOP_AFTER = 8  # steps before the interruption: step 2 of epoch 1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))


def _determined(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the bias of the convolution in front of BatchNorm and BN's running mean, which
    follows it. BN cancels that bias, so its gradient is rounding noise, which AdamW normalises into
    full-size steps that differ between CPUs; the function the network computes does not depend on it."""
    return {key: value for key, value in state.items() if key not in ("0.bias", "1.running_mean")}


def _cosine(step: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / (EPOCHS * STEPS)))


def _trainer(amp_dtype: torch.dtype | None = None) -> MultiScaleTrainer:
    net = _net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    return MultiScaleTrainer(
        net,
        loss=ScaleConsistencyLoss(task="binary", consistency_weight=0.5),
        optimizer=optimizer,
        schedule=constant_schedule(SCALES),
        options=TrainerOptions(epochs=EPOCHS, amp_dtype=amp_dtype),
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine),
    )


def _batches() -> list[MultiScaleBatch]:
    """Class 1 brighter than class 0, from a seeded generator: the same tensors on every machine."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        labels = torch.randint(0, 2, (4,), generator=gen)
        images = {s: torch.randn(4, 3, s, s, generator=gen) + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
                  for s in SCALES}
        batches.append(MultiScaleBatch(images=images, labels=labels))
    return batches


def _interrupted(amp_dtype: torch.dtype | None = None) -> MultiScaleTrainer:
    trainer, data, steps = _trainer(amp_dtype), _batches(), []
    trainer.fit(lambda e: data, lambda e: data[:2], on_step=steps.append,
                should_stop=lambda: len(steps) >= STOP_AFTER)
    return trainer


def _layout(value: Any) -> Any:
    """Keys and value types, recursively: what a checkpoint's format is made of."""
    if isinstance(value, dict):
        return {key: _layout(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_layout(item) for item in value]
    return type(value).__name__


@pytest.fixture
def saved() -> dict[str, Any]:
    # Loaded per test: a trainer's optimizer adopts the loaded tensors and updates them in place.
    return torch.load(FIXTURE, weights_only=True)


def test_a_state_saved_by_the_earlier_trainer_resumes_where_it_stopped(saved):
    old = saved["fp32"]
    trainer = _trainer()
    trainer.load_state_dict(old["trainer"])
    assert (trainer.epoch, trainer.step_in_epoch, trainer.global_step) == (1, STOP_AFTER - STEPS, STOP_AFTER)
    assert all(torch.equal(old["trainer"]["model"][k], v) for k, v in trainer.net.state_dict().items())
    assert trainer.lr_scheduler.last_epoch == STOP_AFTER
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * _cosine(STOP_AFTER))
    assert trainer.adopt_best_weights(old["best_model"], epoch=old["trainer"]["best_epoch"])

    data = _batches()
    result = trainer.fit(lambda e: data[trainer.step_in_epoch:], lambda e: data[:2])
    assert [r.epoch for r in result.history] == [1, 2] and trainer.global_step == EPOCHS * STEPS
    # What the earlier code computed from the same state (float tolerance: it may have run on another CPU).
    torch.testing.assert_close(_determined(trainer.net.state_dict()), _determined(old["final_model"]))
    assert trainer.load_best()
    torch.testing.assert_close(_determined(trainer.net.state_dict()), _determined(old["final_best_model"]))


def test_an_fp16_state_saved_by_the_earlier_trainer_restores_its_loss_scale(saved):
    old = saved["fp16"]["trainer"]
    trainer = _trainer(torch.float16)
    trainer.load_state_dict(old)
    assert trainer.scaler.get_scale() == old["scaler"]["scale"]
    assert trainer.state_dict()["scaler"] == old["scaler"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_trainer_writes_the_state_format_it_always_wrote(saved, precision):
    trainer = _interrupted(torch.float16 if precision == "fp16" else None)
    assert _layout(trainer.state_dict()) == _layout(saved[precision]["trainer"])


def test_best_weights_of_another_epoch_are_refused_and_the_search_starts_again(saved):
    old = saved["fp32"]
    trainer = _trainer()
    trainer.load_state_dict(old["trainer"])
    assert trainer.best_epoch == old["trainer"]["best_epoch"] and trainer.best_score is not None
    assert not trainer.adopt_best_weights(old["best_model"], epoch=old["trainer"]["best_epoch"] + 1)
    assert trainer.best_epoch is None and trainer.best_score is None
    assert not trainer.load_best(), "no best weights: the network keeps its own"


def test_steps_are_renumbered_at_an_epoch_boundary_only():
    trainer = _interrupted()
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, _cosine)
    with pytest.raises(ValueError, match="epoch boundary"):
        trainer.renumber_steps(12, lr_scheduler=scheduler)
    data = _batches()
    trainer.train_epoch(data[trainer.step_in_epoch:], trainer.epoch)
    trainer.renumber_steps(5, lr_scheduler=scheduler)
    assert trainer.global_step == 5 and trainer.state_dict()["lr_scheduler"] == scheduler.state_dict()
