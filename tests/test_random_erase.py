"""Random erasing: relative boxes in timm's/torchvision's ranges, drawn reproducibly, applied purely."""

from __future__ import annotations

import pytest
import torch

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.random_erase import (
    ERASE_AREA,
    ERASE_ASPECT,
    ERASE_FILL,
    apply_erase,
    draw_erase,
    erase_images,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_boxes_lie_in_the_image_with_torchvisions_area_and_aspect_ranges():
    draw = draw_erase(1.0, 256, _generator())
    boxes = draw.boxes[draw.erased]
    assert len(boxes) > 240, "with p = 1 nearly every sample finds a box within 10 attempts"
    top, bottom, left, right = boxes.unbind(1)
    assert (top >= 0).all() and (bottom <= 1).all() and (left >= 0).all() and (right <= 1).all()
    height, width = bottom - top, right - left
    area = height * width
    assert (area >= ERASE_AREA[0] - 1e-9).all() and (area <= ERASE_AREA[1] + 1e-9).all()
    aspect = height / width
    assert (aspect >= ERASE_ASPECT[0] - 1e-9).all() and (aspect <= ERASE_ASPECT[1] + 1e-9).all()
    assert (draw.boxes[~draw.erased] == 0).all()


def test_the_erase_probability_is_respected():
    assert not draw_erase(0.0, 64, _generator()).any
    share = draw_erase(0.25, 4000, _generator()).erased.float().mean().item()
    assert share == pytest.approx(0.25, abs=0.03)


def test_a_draw_consumes_the_same_random_numbers_whatever_it_decides():
    first, second = _generator(5), _generator(5)
    draw_erase(0.0, 16, first)
    draw_erase(1.0, 16, second)
    assert torch.equal(first.get_state(), second.get_state())
    assert torch.equal(draw_erase(0.5, 16, _generator(1)).boxes, draw_erase(0.5, 16, _generator(1)).boxes)


@pytest.mark.parametrize("channels_last", [False, True])
def test_only_the_box_is_filled_and_the_input_is_untouched(channels_last):
    draw = draw_erase(1.0, 4, _generator(2))
    images = torch.randn(4, 3, 20, 30) + 5
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    before = images.clone()
    erased = erase_images(images, draw)
    assert torch.equal(images, before)
    assert erased.is_contiguous(memory_format=torch.channels_last) == channels_last
    for b, (y0, y1, x0, x1) in enumerate(draw.pixel_boxes(20, 30).tolist()):
        inside = torch.zeros(20, 30, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (erased[b][:, inside] == ERASE_FILL).all()
        assert torch.equal(erased[b][:, ~inside], before[b][:, ~inside])


def test_a_batch_without_erased_samples_is_returned_as_it_is():
    batch = MultiScaleBatch(images={16: torch.randn(2, 3, 16, 16)}, labels=torch.tensor([0, 1]))
    assert apply_erase(draw_erase(0.0, 2, _generator()), batch) is batch
