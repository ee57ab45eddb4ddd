"""FixRes fine-tuning preparation: what stays trainable, and which layers run in train mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multiscale_dali.errors import UserError
from multiscale_dali.models.registry import build_model
from multiscale_dali.training.finetune_res import FixResError, find_classifier_head, freeze_for_fixres


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model("tiny_cnn", num_outputs=3)


class WithDropout(nn.Module):
    """No BatchNorm; a dropout that would randomise every train-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(p=0.5)
        self.hidden = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.drop(self.conv(x).mean(dim=(2, 3)))))


def test_only_batchnorm_affine_and_the_head_stay_trainable():
    model = _tiny()
    plan = freeze_for_fixres(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = {id(p) for m in norms for p in (m.weight, m.bias)} | {id(p) for p in model.classifier.parameters()}
    assert {id(p) for p in plan.parameters} == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    assert plan.head == "classifier" and not plan.classifier_only
    assert len(plan.batchnorm_layers) == len(norms)
    assert plan.trainable_count + plan.frozen_count == sum(p.numel() for p in model.parameters())


def test_a_step_updates_statistics_affine_and_head_but_not_the_convolutions():
    model = _tiny()
    plan = freeze_for_fixres(model)
    model.train()  # what a trainer does at every epoch start
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(plan.parameters, lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "features.0.weight" not in changed  # the first convolution is frozen
    assert {"features.1.running_mean", "features.1.weight", "classifier.weight"} <= changed


def test_batchnorm_trains_while_everything_else_stays_in_eval_mode_across_train_calls():
    model = _tiny()
    freeze_for_fixres(model)
    model.train()
    model(torch.randn(2, 3, 16, 16))
    modes = {type(m).__name__: m.training for m in model.modules()}
    assert modes["BatchNorm2d"] is True
    assert modes["Conv2d"] is False and modes["TinyCNN"] is False
    model.eval()  # validation: BatchNorm uses its running statistics
    stats = model.features[1].running_mean.clone()
    model(torch.randn(2, 3, 16, 16))
    assert torch.equal(stats, model.features[1].running_mean)


def test_a_model_without_batchnorm_fine_tunes_its_classifier_only_with_dropout_off():
    model = WithDropout()
    plan = freeze_for_fixres(model)
    assert plan.classifier_only
    assert plan.head == "fc"  # the LAST Linear, not the hidden one
    assert {id(p) for p in plan.parameters} == {id(p) for p in model.fc.parameters()}
    assert "classifier only" in plan.describe()
    model.train()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))  # dropout stays off in train mode


def test_removing_the_hook_gives_normal_train_mode_back():
    model = WithDropout()
    plan = freeze_for_fixres(model)
    plan.remove_hook()
    model.train()
    model(torch.randn(1, 3, 8, 8))
    assert model.drop.training


def test_a_model_without_a_linear_head_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(FixResError, match="Sequential has no nn.Linear") as caught:
        freeze_for_fixres(model)
    assert isinstance(caught.value, UserError)


def test_the_head_of_the_torchvision_models_is_their_classifier():
    assert find_classifier_head(build_model("resnet18", num_outputs=2))[0] == "fc"
    assert find_classifier_head(build_model("mobilenet_v3_small", num_outputs=2))[0] == "classifier.3"


def test_the_modes_hold_inside_the_trainers_multiscale_wrapper():
    from multiscale_dali.training.trainer import MultiScaleModel

    net = WithDropout()
    freeze_for_fixres(net)
    wrapper = MultiScaleModel(net)
    wrapper.train()  # train_epoch's call: recurses into the net
    x = torch.randn(2, 3, 8, 8)
    first, second = wrapper({8: x})[8], wrapper({8: x})[8]
    torch.testing.assert_close(first, second)
    assert not net.drop.training
