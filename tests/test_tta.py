"""Flip test-time augmentation: averaging over a mirror, alone and with the scale ensemble."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multiscale_dali.evaluation.tta import (
    flip_tta_logits,
    flip_tta_probabilities,
    horizontal_flip,
    multiscale_tta_probabilities,
)
from multiscale_dali.training.losses import BINARY, MULTICLASS, probabilities


class MirrorSymmetric(nn.Module):
    """Convolutions with left-right symmetric kernels, then global pooling: flip-invariant output."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
        self.head = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class LeftMinusRight(nn.Module):
    """One logit: mean of the left half minus mean of the right half (negated by a flip)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))).unsqueeze(1)


class LeftMinusRightTwoClasses(LeftMinusRight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return torch.cat([z, -z], dim=1)


def _ramp(batch: int = 3, size: int = 8) -> torch.Tensor:
    """Images brighter on the left, by a different amount per sample."""
    ramp = torch.linspace(1, -1, size).view(1, 1, 1, size)
    return ramp * torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1, 1) * torch.ones(batch, 3, size, 1)


def test_a_mirror_symmetric_model_gives_the_probabilities_of_one_view():
    model = MirrorSymmetric(outputs=4).eval()
    images = torch.randn(5, 3, 12, 12)
    expected = probabilities(model(images), task=MULTICLASS)
    torch.testing.assert_close(flip_tta_probabilities(model, images, task=MULTICLASS), expected)


def test_an_asymmetric_binary_model_averages_to_one_half():
    images = _ramp()
    single = probabilities(LeftMinusRight()(images), task=BINARY)
    assert (single[:, 1] > 0.6).all()  # one view alone is confident
    averaged = flip_tta_probabilities(LeftMinusRight(), images, task=BINARY)
    torch.testing.assert_close(averaged, torch.full_like(averaged, 0.5))


def test_an_asymmetric_multiclass_model_averages_the_softmax_of_both_views():
    model = LeftMinusRightTwoClasses()
    images = _ramp()
    both = [probabilities(model(x), task=MULTICLASS) for x in (images, horizontal_flip(images))]
    averaged = flip_tta_probabilities(model, images, task=MULTICLASS)
    torch.testing.assert_close(averaged, (both[0] + both[1]) / 2)
    torch.testing.assert_close(averaged, torch.full_like(averaged, 0.5))


@pytest.mark.parametrize("task,model", [(BINARY, LeftMinusRight()), (MULTICLASS, MirrorSymmetric(outputs=3))])
def test_tta_logits_carry_the_averaged_probabilities(task, model):
    images = _ramp() + 0.1 * torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(probabilities(flip_tta_logits(model, images, task=task), task=task),
                               flip_tta_probabilities(model, images, task=task))


def test_flip_and_scales_combine_into_one_mean():
    model = MirrorSymmetric(outputs=3).eval()
    images = {8: torch.randn(2, 3, 8, 8), 12: torch.randn(2, 3, 12, 12)}
    combined = multiscale_tta_probabilities(model, images, task=MULTICLASS, flip=True)
    per_scale = [flip_tta_probabilities(model, images[s], task=MULTICLASS) for s in (8, 12)]
    torch.testing.assert_close(combined, (per_scale[0] + per_scale[1]) / 2)
    no_flip = multiscale_tta_probabilities(LeftMinusRight(), {8: _ramp(size=8)}, task=BINARY, flip=False)
    assert (no_flip[:, 1] > 0.6).all()


def test_horizontal_flip_mirrors_width_and_keeps_channels_last():
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4).to(memory_format=torch.channels_last)
    flipped = horizontal_flip(images)
    assert torch.equal(flipped[..., 0], images[..., -1])
    assert flipped.is_contiguous(memory_format=torch.channels_last)


def test_scales_must_hold_the_same_samples():
    with pytest.raises(ValueError, match="same samples"):
        multiscale_tta_probabilities(LeftMinusRight(), {8: torch.zeros(2, 3, 8, 8), 12: torch.zeros(3, 3, 12, 12)},
                                     task=BINARY)
