"""The training recipe through the trainer: one draw shared by every scale, soft targets, the weight EMA.

The network below records what each scale's forward received. Every sample's images are a constant
(its index + 1), so a mixed or erased image shows which partner, which weight and which box it got.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.training.losses import ScaleConsistencyLoss, StepLosses
from multiscale_dali.training.metrics import ScaleMeter
from multiscale_dali.training.mixing import MixConfig
from multiscale_dali.training.random_erase import ERASE_FILL
from multiscale_dali.training.recipe import PreparedBatch, RecipeOptions, StepRecipe
from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

SCALES = (16, 24)  # 24 is not a multiple of 16: boxes are rounded differently at the two scales
BATCH = 8


class SpyNet(nn.Module):
    """A linear head on the mean colour; remembers every training input, by scale."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.head = nn.Linear(3, outputs)
        self.bn = nn.BatchNorm1d(3)
        self.seen: dict[int, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen[x.shape[-1]] = x.detach().clone()
        return self.head(self.bn(x.mean(dim=(2, 3))))


class SpyLoss(ScaleConsistencyLoss):
    """The objective, remembering the targets it was given."""

    targets: object = None

    def step_losses(self, logits_by_scale, labels) -> StepLosses:
        self.targets = labels
        return super().step_losses(logits_by_scale, labels)


def _batch() -> MultiScaleBatch:
    labels = torch.arange(BATCH)
    return MultiScaleBatch(images={s: (labels.float() + 1).view(-1, 1, 1, 1).expand(-1, 3, s, s).clone()
                                   for s in SCALES}, labels=labels)


def _trainer(options: RecipeOptions, *, consistency: float = 0.5, memory_efficient: bool = False,
             seed: int = 0) -> MultiScaleTrainer:
    torch.manual_seed(0)
    net = SpyNet(BATCH)
    return MultiScaleTrainer(
        net, loss=SpyLoss(task="multiclass", consistency_weight=consistency),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), schedule=constant_schedule(SCALES),
        options=TrainerOptions(epochs=2, memory_efficient=memory_efficient),
        recipe=StepRecipe(options, model=net, task="multiclass", num_classes=BATCH, seed=seed))


def _one_step(trainer: MultiScaleTrainer) -> dict[int, torch.Tensor]:
    trainer.model.train()
    trainer._step(_batch(), ScaleMeter())
    return trainer.net.seen


def _box(image: torch.Tensor, differs_from: float) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` of the pixels of one channel that differ from ``differs_from``."""
    rows, cols = torch.nonzero(image[0] != differs_from, as_tuple=True)
    if rows.numel() == 0:
        return None
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert (image[0, y0:y1, x0:x1] != differs_from).all(), "the changed pixels form one rectangle"
    return y0, y1, x0, x1


def _same_relative_box(boxes: dict[int, tuple[int, int, int, int]]) -> None:
    """Each edge at each scale is the rounding of one relative coordinate (within half a pixel)."""
    small, large = SCALES
    for edge_small, edge_large in zip(boxes[small], boxes[large]):
        assert abs(edge_small / small - edge_large / large) <= 0.5 / small + 0.5 / large


def test_mixup_mixes_every_scale_with_the_same_partner_and_weight():
    trainer = _trainer(RecipeOptions(mix=MixConfig(mixup_alpha=1.0)))
    seen = _one_step(trainer)
    values = {s: seen[s][:, 0, 0, 0] for s in SCALES}
    assert all((seen[s] == values[s].view(-1, 1, 1, 1)).all() for s in SCALES), "MixUp keeps images flat"
    torch.testing.assert_close(values[16], values[24], rtol=0, atol=1e-6)
    # Each target row holds lam on the sample's own label and 1 - lam on its partner's: the same at both scales.
    targets = trainer.loss.targets
    torch.testing.assert_close(targets[16], targets[24])
    own = targets[16][torch.arange(BATCH), torch.arange(BATCH)]
    partner = torch.where(targets[16].clone().fill_diagonal_(0) > 0, 1, 0).argmax(dim=1)
    expected = own * (torch.arange(BATCH) + 1) + (1 - own) * (partner + 1)
    torch.testing.assert_close(values[16], expected.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["one-graph", "memory-efficient"])
def test_cutmix_pastes_one_relative_box_at_every_scale_with_each_scales_own_weight(memory_efficient):
    trainer = _trainer(RecipeOptions(mix=MixConfig(cutmix_alpha=1.0)), memory_efficient=memory_efficient)
    seen = _one_step(trainer)
    partners = {}
    for b in range(BATCH):
        boxes = {s: _box(seen[s][b], b + 1.0) for s in SCALES}
        if any(box is None for box in boxes.values()):
            # Paired with itself, or a box that rounds to nothing at one scale: nothing to compare.
            continue
        _same_relative_box(boxes)
        pasted = {s: seen[s][b][0, boxes[s][0], boxes[s][2]].item() - 1 for s in SCALES}
        assert pasted[16] == pasted[24], "the partner is the same at every scale"
        partners[b] = int(pasted[16])
    assert partners, "some samples got a box from another sample"
    if not memory_efficient:  # the one-graph step hands the loss every scale's targets at once
        targets, (b, partner) = trainer.loss.targets, next(iter(partners.items()))
        for s in SCALES:
            y0, y1, x0, x1 = _box(seen[s][b], b + 1.0)
            lam = 1 - (y1 - y0) * (x1 - x0) / (s * s)  # corrected for the box pasted at this scale
            assert targets[s][b, b].item() == pytest.approx(lam)
            assert targets[s][b, partner].item() == pytest.approx(1 - lam)


def test_random_erasing_removes_the_same_relative_box_at_every_scale():
    trainer = _trainer(RecipeOptions(random_erase=1.0))
    seen = _one_step(trainer)
    erased = 0
    for b in range(BATCH):
        boxes = {s: _box(seen[s][b], b + 1.0) for s in SCALES}
        if all(box is None for box in boxes.values()):
            continue
        erased += 1
        _same_relative_box(boxes)
        for s, (y0, y1, x0, x1) in boxes.items():
            assert (seen[s][b, :, y0:y1, x0:x1] == ERASE_FILL).all()
    assert erased >= BATCH // 2


def test_the_input_batch_is_left_as_it_was():
    recipe = StepRecipe(RecipeOptions(mix=MixConfig(cutmix_alpha=1.0), random_erase=1.0), num_classes=BATCH)
    batch = _batch()
    before = {s: x.clone() for s, x in batch.images.items()}
    prepared = recipe.prepare(batch)
    assert all(torch.equal(batch.images[s], before[s]) for s in SCALES)
    assert not all(torch.equal(prepared.batch.images[s], before[s]) for s in SCALES)


def test_a_mixed_sample_is_counted_right_against_its_dominant_label():
    labels = torch.tensor([0, 1, 2])
    batch = MultiScaleBatch(images={16: torch.zeros(3, 3, 16, 16)}, labels=labels)
    targets = {16: torch.eye(3)}
    mostly_partner = PreparedBatch(batch=batch, targets=targets, metric_labels={16: labels[[1, 2, 0]]})
    assert mostly_partner.labels_at(16).tolist() == [1, 2, 0]
    assert PreparedBatch(batch=batch, targets=labels).labels_at(16) is labels


def test_label_smoothing_changes_the_training_loss_but_not_the_evaluation_loss():
    trainer = _trainer(RecipeOptions(mix=MixConfig(label_smoothing=0.2)))
    _one_step(trainer)
    smoothed = trainer.loss.targets[16]
    assert smoothed.max().item() == pytest.approx(0.8 + 0.2 / BATCH)
    batch = _batch()
    metrics = trainer.evaluate([batch], scales=[16])
    with torch.no_grad():
        trainer.net.eval()
        plain = F.cross_entropy(trainer.net(batch.images[16]), batch.labels).item()
    assert metrics[16]["loss"] == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("select_ema", [True, False], ids=["ema", "raw"])
def test_the_ema_is_validated_beside_the_raw_weights_and_select_on_picks_best(select_ema):
    trainer = _trainer(RecipeOptions(ema_decay=0.5, select_ema=select_ema), consistency=0.0)
    data = [_batch() for _ in range(3)]
    result = trainer.fit(lambda e: data, lambda e: data[:1])
    record = result.history[-1]
    assert set(record.val) == set(record.val_ema) == set(SCALES)
    assert "val_ema" in record.to_json()
    state = trainer.state_dict()
    assert state["ema"]["step"] == trainer.global_step == 6, "one EMA update per optimiser step"
    ema_weights = state["ema"]["module"]
    assert not all(torch.equal(ema_weights[k], v) for k, v in trainer.net.state_dict().items())
    kept = trainer.selected_net.state_dict()
    expected = ema_weights if select_ema else trainer.net.state_dict()
    assert all(torch.equal(kept[k], expected[k]) for k in kept)
    # BatchNorm statistics of the average are the trained model's, copied rather than averaged.
    assert torch.equal(ema_weights["bn.running_mean"], trainer.net.state_dict()["bn.running_mean"])


def test_without_an_ema_nothing_new_is_validated_or_saved():
    trainer = _trainer(RecipeOptions(), consistency=0.0)
    result = trainer.fit(lambda e: [_batch()], lambda e: [_batch()])
    assert result.history[-1].val_ema == {} and "val_ema" not in result.history[-1].to_json()
    assert not {"ema", "recipe_rngs"} & set(trainer.state_dict())


def test_two_ranks_draw_differently_and_one_seed_draws_the_same():
    options = RecipeOptions(mix=MixConfig(cutmix_alpha=1.0))
    draws = [StepRecipe(options, num_classes=BATCH, seed=0, rank=rank).prepare(_batch()).batch.images[16]
             for rank in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_recipe_runs_on_the_device_and_erases_as_on_the_cpu():
    options = RecipeOptions(mix=MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1),
                            random_erase=1.0, ema_decay=0.9, select_ema=True)
    prepared = {}
    for device in ("cpu", "cuda"):
        net = SpyNet(BATCH).to(device)
        recipe = StepRecipe(options, model=net, task="multiclass", num_classes=BATCH, seed=7)
        batch = _batch()
        batch = MultiScaleBatch(images={s: x.to(device) for s, x in batch.images.items()},
                                labels=batch.labels.to(device))
        prepared[device] = recipe.prepare(batch)
        recipe.after_step(net)
        assert all(p.device.type == device for p in recipe.models(net)["ema"].parameters())
    for s in SCALES:
        assert prepared["cuda"].batch.images[s].device.type == "cuda"
        torch.testing.assert_close(prepared["cuda"].batch.images[s].cpu(), prepared["cpu"].batch.images[s])
        torch.testing.assert_close(prepared["cuda"].target_at(s).cpu(), prepared["cpu"].target_at(s))
