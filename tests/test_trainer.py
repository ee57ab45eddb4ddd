import math

import pytest
import torch
from torch import nn

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.losses import ScaleConsistencyLoss
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.training.mixing import MixConfig
from multiscale_dali.training.recipe import RecipeOptions, StepRecipe
from multiscale_dali.models.registry import build_model
from multiscale_dali.pipelines.schedule import constant_schedule, stepwise_schedule
from multiscale_dali.training.trainer import (
    MultiScaleTrainer,
    NonFiniteLossError,
    ProgressiveMultiScaleTrainer,
    TrainerOptions,
)


def _bright_vs_dark_batches(scales, *, steps=6, batch_size=8, seed=0):
    """Class 1 images are brighter than class 0: learnable in a few steps at any scale."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        images = {}
        for s in scales:
            noise = torch.randn(batch_size, 3, s, s, generator=gen)
            images[s] = noise + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
        batches.append(MultiScaleBatch(images=images, labels=labels))
    return batches


# MixUp/CutMix, label smoothing, random erasing and a weight EMA: every piece with state of its own.
RECIPE = RecipeOptions(mix=MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1), random_erase=0.5,
                       ema_decay=0.9, select_ema=True)


def _trainer(cls=MultiScaleTrainer, *, schedule, epochs=3, weight=0.5, memory_efficient=False, lr=1e-2,
             accum_steps=1, recipe: RecipeOptions | None = None):
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_outputs=1)
    return cls(
        model,
        loss=ScaleConsistencyLoss(task="binary", consistency_weight=weight),
        optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
        schedule=schedule,
        options=TrainerOptions(epochs=epochs, memory_efficient=memory_efficient, accum_steps=accum_steps),
        recipe=None if recipe is None else StepRecipe(recipe, model=model, task="binary", num_classes=2, seed=3),
    )


def test_multiscale_trainer_learns_and_reports_every_scale():
    scales = (16, 24, 32)
    trainer = _trainer(schedule=constant_schedule(scales), epochs=4)
    data = _bright_vs_dark_batches(scales)
    result = trainer.fit(lambda e: data, lambda e: data[:2])
    first, last = result.history[0], result.history[-1]
    assert set(last.train) == set(scales) and set(last.val) == set(scales)
    assert last.train[32]["loss"] < first.train[32]["loss"]
    assert last.val[32]["accuracy"] >= 0.9
    assert last.train_loss_components["consistency"] > 0, "different scales disagree a little"
    assert result.best_epoch is not None and trainer.global_step == 4 * len(data)


def test_memory_efficient_step_matches_naive_gradients():
    scales = (16, 24, 32)
    batch = _bright_vs_dark_batches(scales, steps=1)[0]
    grads = []
    for memory_efficient in (False, True):
        trainer = _trainer(schedule=constant_schedule(scales), memory_efficient=memory_efficient)
        trainer.model.train()
        # Capture gradients just before the optimizer step.
        trainer.optimizer.step = lambda *a, **k: None
        trainer._step(batch, ScaleMeter())
        grads.append([p.grad.clone() for p in trainer.net.parameters()])
    for naive, efficient in zip(*grads):
        torch.testing.assert_close(naive, efficient, rtol=1e-4, atol=1e-6)


def test_progressive_trainer_validates_current_and_final_scale():
    schedule = stepwise_schedule({0: 16, 1: 24, 2: 32})
    trainer = _trainer(ProgressiveMultiScaleTrainer, schedule=schedule, epochs=3, weight=0.0)
    all_scales = (16, 24, 32)
    data = _bright_vs_dark_batches(all_scales, steps=3)

    def only(epoch):
        scale = schedule.scales_at(epoch)[0]
        return [MultiScaleBatch({scale: b.images[scale]}, b.labels) for b in data]

    result = trainer.fit(only, lambda e: data)
    assert [tuple(r.train) for r in result.history] == [(16,), (24,), (32,)]
    assert [tuple(r.val) for r in result.history] == [(16, 32), (24, 32), (32,)]


def test_progressive_trainer_rejects_multi_scale_schedule():
    with pytest.raises(ValueError, match="one scale per epoch"):
        _trainer(ProgressiveMultiScaleTrainer, schedule=constant_schedule((16, 32)))


def test_best_model_is_restored_from_the_best_validation_epoch():
    scales = (16,)
    trainer = _trainer(schedule=constant_schedule(scales), epochs=3, weight=0.0)
    data = _bright_vs_dark_batches(scales)
    flipped = [MultiScaleBatch(b.images, 1 - b.labels) for b in data[:2]]
    snapshots = {}
    # Validation agrees with the task only at epoch 1, so epoch 1 must win over the final epoch.
    result = trainer.fit(lambda e: data, lambda e: data[:2] if e == 1 else flipped,
                         on_epoch_end=lambda r: snapshots.setdefault(
                             r.epoch, {k: v.clone() for k, v in trainer.net.state_dict().items()}))
    assert result.best_epoch == 1 and [r.is_best for r in result.history] == [True, True, False]
    final = snapshots[2]
    trainer.load_best()
    restored = trainer.net.state_dict()
    assert all(torch.equal(snapshots[1][k], restored[k]) for k in restored)
    assert not all(torch.equal(final[k], restored[k]) for k in restored)


def test_non_finite_losses_are_skipped_then_stop_the_run():
    scales = (16,)
    trainer = _trainer(schedule=constant_schedule(scales), weight=0.0)
    trainer.options = TrainerOptions(epochs=1, max_consecutive_nonfinite=3)
    good = _bright_vs_dark_batches(scales, steps=1)[0]
    bad = MultiScaleBatch({16: torch.full_like(good.images[16], math.nan)}, good.labels)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    record = trainer.train_epoch([bad, bad], epoch=0)
    assert record.skipped_steps == 2
    after = trainer.net.state_dict()
    # Weights and BatchNorm running statistics alike: a NaN batch must not poison later evaluation.
    assert all(torch.equal(before[k], after[k]) for k in before), "skipped steps change nothing"
    with pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.train_epoch([bad], epoch=0)


def test_multiscale_model_runs_every_scale_in_one_forward():
    from multiscale_dali.training.trainer import MultiScaleModel

    calls = []
    net = nn.Flatten()
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-1]))
    out = MultiScaleModel(net)({8: torch.zeros(1, 3, 8, 8), 4: torch.zeros(1, 3, 4, 4)})
    assert sorted(out) == [4, 8] and sorted(calls) == [4, 8]


def _roundtrip(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "stop_after_steps, accum_steps, recipe",
    [(12, 1, None), (8, 1, None), (4, 2, None), (3, 4, None), (12, 1, RECIPE), (8, 1, RECIPE), (4, 2, RECIPE)],
    ids=["epoch-boundary", "mid-epoch", "mid-epoch-accumulating-2", "mid-epoch-accumulating-4",
         "recipe-epoch-boundary", "recipe-mid-epoch", "recipe-mid-epoch-accumulating-2"])
def test_resumed_trainer_ends_with_bit_identical_weights(tmp_path, stop_after_steps, accum_steps, recipe):
    """``stop_after_steps`` optimiser steps; with 4 micro-batches a step, an epoch of 6 batches ends
    with a shortened step of 2. The recipe (MixUp/CutMix, erasing, smoothing, EMA) resumes exactly too."""
    scales = (16, 24)
    data = _bright_vs_dark_batches(scales, steps=6)
    reference = _trainer(schedule=constant_schedule(scales), epochs=3, accum_steps=accum_steps, recipe=recipe)
    expected = reference.fit(lambda e: data, lambda e: data[:2])

    first = _trainer(schedule=constant_schedule(scales), epochs=3, accum_steps=accum_steps, recipe=recipe)
    steps = []
    first.fit(lambda e: data, lambda e: data[:2], on_step=steps.append,
              should_stop=lambda: len(steps) >= stop_after_steps)
    state = _roundtrip(first.state_dict(), tmp_path)
    assert state["global_step"] == stop_after_steps

    resumed = _trainer(schedule=constant_schedule(scales), epochs=3, accum_steps=accum_steps, recipe=recipe)
    resumed.load_state_dict(state)
    assert 0 < resumed.step_in_epoch < len(data) or stop_after_steps == 12
    # The loaders replay the rest of the interrupted epoch; here that is a slice of the data.
    result = resumed.fit(lambda e: data[resumed.step_in_epoch:], lambda e: data[:2])
    for a, b in zip(reference.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.global_step == reference.global_step
    if recipe is not None:  # the average, its update count and the next draws continue exactly too
        final, again = reference.state_dict(), resumed.state_dict()
        assert again["ema"]["step"] == final["ema"]["step"] == reference.global_step
        assert all(torch.equal(final["ema"]["module"][k], v) for k, v in again["ema"]["module"].items())
        assert all(torch.equal(final["recipe_rngs"][0][k], v) for k, v in again["recipe_rngs"][0].items())
        assert result.history[-1].val_ema == expected.history[-1].val_ema
    # The interrupted epoch's metrics cover its steps from before and after the resume.
    for scale, metrics in expected.history[-1].train.items():
        assert result.history[-1].train[scale] == pytest.approx(metrics)


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    trainer = _trainer(schedule=constant_schedule((16,)), epochs=1)
    trainer.fit(lambda e: _bright_vs_dark_batches((16,), steps=2), None)
    state = _roundtrip(trainer.state_dict(), tmp_path)
    assert state["epoch"] == 1 and "scaler" not in state, "a disabled GradScaler is not saved"
