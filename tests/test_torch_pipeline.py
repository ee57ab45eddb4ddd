"""The torchvision backend: geometry, schedule, ordering, sharding and decoding rules."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import make_jpeg_folder, make_spec, run_loader, synthetic_image, to_uint8
from multiscale_dali.pipelines.schedule import constant_schedule, stepwise_schedule
from multiscale_dali.pipelines.sampling import eval_crop_box, padded_sample_order
from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader, epoch_batches, load_rgb, random_crop_box

PROGRESSIVE = stepwise_schedule({0: 32, 1: 48, 2: 64})
# In-process decoding keeps these tests fast; worker processes are exercised where they matter.
_spec = functools.partial(make_spec, num_workers=0)
_run = functools.partial(run_loader, TorchvisionLoader)


def test_train_scales_of_a_sample_share_one_crop_and_flip(jpeg_folder):
    files, labels = jpeg_folder
    (batches,) = _run(_spec(files, labels, train=True, batch_size=8, schedule=constant_schedule([32, 64])), [0])
    largest, small = to_uint8(batches[0].images[64]), to_uint8(batches[0].images[32])
    # The small scale is, by construction, the very same resize of the largest output.
    assert torch.equal(F.resize(largest, [32, 32], antialias=True), small)
    flipped = F.resize(largest.flip(-1), [32, 32], antialias=True)
    assert (flipped.float() - small.float()).abs().mean(dim=(1, 2, 3)).min() > 10


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_progressive_sizes_follow_the_schedule_at_every_step(tmp_path, num_workers, drop_last):
    files, labels = make_jpeg_folder(tmp_path, classes=2, per_class=5)  # 10 files: uneven last batch
    spec = _spec(files, labels, schedule=PROGRESSIVE, num_workers=num_workers, drop_last=drop_last, train=True)
    epochs = _run(spec, range(3))
    for epoch, batches in enumerate(epochs):
        assert len(batches) == spec.steps_per_epoch == (2 if drop_last else 3)
        for batch in batches:
            assert batch.scales == PROGRESSIVE.scales_at(epoch)
            (images,) = batch.images.values()
            assert images.shape[-1] == images.shape[-2] == PROGRESSIVE.scales_at(epoch)[0]


def test_train_pixels_do_not_depend_on_worker_count(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, train=True, schedule=PROGRESSIVE)
    runs = [_run(spec, range(2)), _run(_spec(files, labels, train=True, schedule=PROGRESSIVE, num_workers=2), range(2))]
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x.labels, y.labels)
            assert all(torch.equal(x.images[s], y.images[s]) for s in x.scales)


def test_resumed_run_sees_the_same_epoch_as_an_uninterrupted_one(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, train=True, schedule=PROGRESSIVE)
    uninterrupted = _run(spec, range(3))[2]
    (resumed,) = _run(spec, [2])
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images[64], b.images[64])


@pytest.mark.parametrize("train", [False, True])
def test_two_shards_cover_every_sample_in_the_same_number_of_steps(tmp_path, train):
    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=11)
    ids = list(range(len(files)))
    seen, steps = [], []
    for shard_id in range(2):
        spec = _spec(files, ids, num_shards=2, shard_id=shard_id, train=train, schedule=constant_schedule([16]))
        (batches,) = _run(spec, [0])
        steps.append(len(batches))
        seen += torch.cat([b.labels for b in batches]).tolist()
    assert steps == [spec.steps_per_epoch] * 2 == [2, 2]
    assert len(seen) == 2 * spec.shard_size == 12  # one padding sample
    assert set(seen) == set(ids)


def test_shards_read_contiguous_blocks_of_the_padded_order():
    assert padded_sample_order(11, 3) == list(range(11)) + [0]
    assert padded_sample_order(2, 5) == [0, 1, 0, 1, 0]
    assert padded_sample_order(3, 2, order=[2, 0, 1]) == [2, 0, 1, 2]


def test_epoch_batches_drop_the_partial_batch_only_when_the_spec_does(jpeg_folder):
    files, labels = jpeg_folder  # 8 files
    assert [len(b) for b in epoch_batches(_spec(files, labels, batch_size=3), 0)] == [3, 3, 2]
    assert [len(b) for b in epoch_batches(_spec(files, labels, batch_size=3, drop_last=True), 0)] == [3, 3]
    # A lone partial batch is kept even with drop_last (LoaderSpec.steps_per_epoch is 1).
    assert [len(b) for b in epoch_batches(_spec(files, labels, batch_size=16, drop_last=True), 0)] == [8]


def test_eval_crop_box_is_the_floored_centre_square():
    assert eval_crop_box(64, 96, 0.875) == (4, 20, 56)
    assert eval_crop_box(375, 500, 0.875) == (23, 86, 328)  # 328.125 floors to 328
    assert eval_crop_box(10, 10, 1.0) == (0, 0, 10)
    assert eval_crop_box(1, 9, 0.5) == (0, 4, 1)  # never an empty crop


def test_random_crop_box_stays_inside_the_image_and_in_the_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_crop_box(rng, 90, 150, area=(0.25, 1.0), aspect=(3 / 4, 4 / 3))
        assert 0 <= top <= 90 - h and 0 <= left <= 150 - w
        assert 0.2 <= h * w / (90 * 150) <= 1.0
        assert 0.7 <= w / h <= 1.4
    # No attempt can fit a 4:3 crop of that area into a 1 x 100 strip: centre fallback, aspect clamped.
    assert random_crop_box(rng, 1, 100, area=(0.9, 1.0), aspect=(3 / 4, 4 / 3)) == (0, 49, 1, 1)


@pytest.mark.parametrize(
    "mode, suffix",
    [("L", ".jpg"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".webp")],
)
def test_any_colour_mode_decodes_to_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(synthetic_image(40, 30, seed=1)).convert(mode).save(path)
    image = load_rgb(str(path))
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 30, 40)


def test_corrupt_file_raises_an_error_naming_it(tmp_path, jpeg_folder):
    files, labels = jpeg_folder
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(Path(files[0]).read_bytes()[:200])
    with pytest.raises(RuntimeError, match="truncated.jpg"):
        load_rgb(str(bad))
    with pytest.raises(RuntimeError, match="truncated.jpg"):
        _run(_spec([str(bad)] + files[1:], labels), [0])
