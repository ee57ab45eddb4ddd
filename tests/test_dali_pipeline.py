"""The DALI backend on CPU (``device_id=None``), plus one GPU test for the mixed decoder."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms.v2 import functional as F

pytest.importorskip("nvidia.dali")

from conftest import make_jpeg_folder, make_spec, run_loader, to_uint8  # noqa: E402
from multiscale_dali.pipelines.dali.graph import ScheduledSizes  # noqa: E402
from multiscale_dali.pipelines.dali.loader import DaliLoader  # noqa: E402
from multiscale_dali.pipelines.dali.pipeline import decode_only_pipeline  # noqa: E402
from multiscale_dali.pipelines.schedule import constant_schedule, stepwise_schedule  # noqa: E402

PROGRESSIVE = stepwise_schedule({0: 32, 1: 48, 2: 64})
_spec = make_spec
_run = functools.partial(run_loader, DaliLoader)


def _order(batches) -> list[int]:
    return torch.cat([b.labels for b in batches]).tolist()


def test_train_scales_of_a_sample_share_one_crop_and_flip(jpeg_folder):
    files, labels = jpeg_folder
    (batches,) = _run(_spec(files, labels, train=True, batch_size=8, schedule=constant_schedule([32, 64])), [0])
    largest, small = to_uint8(batches[0].images[64]), to_uint8(batches[0].images[32]).float()
    # DALI's and torchvision's antialiased kernels differ by a few levels (measured: max 4, per-image
    # mean <= 0.25); another flip or another crop of these images differs by tens of levels per pixel.
    same = (F.resize(largest, [32, 32], antialias=True).float() - small).abs()
    flipped = (F.resize(largest.flip(-1), [32, 32], antialias=True).float() - small).abs()
    assert same.amax() <= 8 and same.mean(dim=(1, 2, 3)).max() <= 1.0
    assert flipped.mean(dim=(1, 2, 3)).min() > 10


@pytest.mark.parametrize("drop_last", [False, True])
def test_progressive_sizes_follow_the_schedule_at_every_step_despite_prefetching(tmp_path, drop_last):
    files, labels = make_jpeg_folder(tmp_path, classes=2, per_class=5)  # 10 files: uneven last batch
    spec = _spec(files, labels, schedule=PROGRESSIVE, drop_last=drop_last, train=True)
    epochs = _run(spec, range(3))
    for epoch, batches in enumerate(epochs):
        assert len(batches) == spec.steps_per_epoch == (2 if drop_last else 3)
        for batch in batches:
            (images,) = batch.images.values()
            assert batch.scales == PROGRESSIVE.scales_at(epoch)
            assert images.shape[-1] == images.shape[-2] == PROGRESSIVE.scales_at(epoch)[0]


def test_resumed_run_starts_at_the_sizes_of_its_first_epoch(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, schedule=PROGRESSIVE, train=True, batch_size=3)
    resumed = _run(spec, [1, 2])
    assert [{b.scales for b in batches} for batches in resumed] == [{(48,)}, {(64,)}]
    assert [len(batches) for batches in resumed] == [3, 3]


def test_epochs_must_run_forwards_and_progressive_epochs_consecutively(jpeg_folder):
    files, labels = jpeg_folder
    loader = DaliLoader(_spec(files, labels, schedule=PROGRESSIVE))
    list(loader.epoch(1))
    with pytest.raises(ValueError, match="epoch 0"):
        loader.epoch(0)
    with pytest.raises(ValueError, match="epoch 3"):
        loader.epoch(3)
    loader.close()
    constant = DaliLoader(_spec(files, labels))
    list(constant.epoch(0))
    assert len(list(constant.epoch(5))) == len(constant)  # a constant schedule may skip epochs
    constant.close()


def test_abandoned_epoch_is_drained_so_the_next_starts_on_its_first_batch(jpeg_folder):
    files, labels = jpeg_folder
    loader = DaliLoader(_spec(files, labels, schedule=PROGRESSIVE, batch_size=3))
    next(iter(loader.epoch(0)))
    batches = list(loader.epoch(1))
    loader.close()
    assert len(batches) == 3 and _order(batches) == labels
    assert {b.scales for b in batches} == {(48,)}


@pytest.mark.parametrize("num_files, num_shards, batch_size", [(11, 2, 4), (11, 3, 3), (5, 3, 4)])
@pytest.mark.parametrize("train", [False, True])
def test_shards_cover_every_sample_in_the_same_number_of_steps(tmp_path, num_files, num_shards, batch_size, train):
    # Unpadded, 11 files over 3 shards would give DALI shards of 3, 4 and 4 samples and 1 or 2
    # batches per shard; the loader pads the file list so every shard reads shard_size samples.
    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=num_files)
    ids = list(range(num_files))
    specs = [
        _spec(files, ids, num_shards=num_shards, shard_id=k, batch_size=batch_size, train=train)
        for k in range(num_shards)
    ]
    runs = [_run(spec, range(2)) for spec in specs]  # two epochs: DALI moves shards between epochs
    for epoch in range(2):
        assert [len(run[epoch]) for run in runs] == [specs[0].steps_per_epoch] * num_shards
        seen = [label for run in runs for label in _order(run[epoch])]
        assert len(seen) == specs[0].shard_size * num_shards
        assert set(seen) == set(ids)


def test_train_pixels_repeat_for_a_fixed_seed(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, train=True, num_workers=2)
    a, b = _run(spec, [0])[0], _run(spec, [0])[0]
    assert all(torch.equal(x.images[64], y.images[64]) for x, y in zip(a, b))


def test_len_matches_what_dali_yields_with_drop_last(tmp_path):
    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=7)
    for batch_size, drop_last in [(3, True), (3, False), (7, True), (8, True)]:
        spec = _spec(files, list(range(7)), batch_size=batch_size, drop_last=drop_last)
        (batches,) = _run(spec, [0])
        assert len(batches) == len(DaliLoader(spec)) == spec.steps_per_epoch


def test_a_size_that_disagrees_with_the_schedule_raises(jpeg_folder, monkeypatch):
    files, labels = jpeg_folder
    monkeypatch.setattr(ScheduledSizes, "epoch_of", lambda self, iteration: 0)  # a callback bug
    loader = DaliLoader(_spec(files, labels, schedule=PROGRESSIVE))
    list(loader.epoch(0))
    with pytest.raises(RuntimeError, match="schedule says 48x48x3"):
        list(loader.epoch(1))
    loader.close()


def test_scheduled_sizes_is_a_picklable_pure_function_of_the_iteration():
    sizes = ScheduledSizes(schedule=PROGRESSIVE, iterations_per_epoch=3, batch_size=2, first_epoch=1)
    again = pickle.loads(pickle.dumps(sizes))
    for iteration, scale in [(0, 48), (2, 48), (3, 64), (30, 64)]:
        (batch,) = again(SimpleNamespace(iteration=iteration, epoch_idx=0))
        assert len(batch) == 2 and batch[0].tolist() == [scale, scale]
        assert sizes(SimpleNamespace(iteration=iteration, epoch_idx=0))[0][0].tolist() == [scale, scale]


def test_corrupt_file_raises_runtime_error_keeping_dalis_message(tmp_path, jpeg_folder):
    files, labels = jpeg_folder
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(Path(files[0]).read_bytes()[:200])
    with pytest.raises(RuntimeError, match="(?s)DALI said:.*decoders"):
        _run(_spec([str(bad)] + files[1:], labels, train=True), [0])
    with pytest.raises(RuntimeError, match="missing.jpg"):
        _run(_spec([str(tmp_path / "missing.jpg")] + files[1:], labels), [0])


def test_decode_only_pipeline_decodes_full_images(jpeg_folder):
    files, _ = jpeg_folder
    pipe = decode_only_pipeline(files=files[:2], batch_size=2, num_threads=1)
    images, _ = pipe.run()
    assert [tuple(images[i].shape()) for i in range(2)] == [(64, 96, 3), (120, 80, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_decoder_on_gpu_yields_cuda_batches_with_one_crop_per_sample(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, device="cuda", train=True, batch_size=8, schedule=constant_schedule([32, 64]))
    (batches,) = _run(spec, [0])
    batch = batches[0]
    assert batch.labels.device.type == "cuda" and sorted(batch.labels.tolist()) == sorted(labels)
    assert all(t.device.type == "cuda" and t.shape[-1] == s for s, t in batch.images.items())
    largest, small = to_uint8(batch.images[64]), to_uint8(batch.images[32]).float()
    same = (F.resize(largest, [32, 32], antialias=True).float() - small).abs()
    assert same.mean(dim=(1, 2, 3)).max() <= 1.0
    (progressive,) = _run(_spec(files, labels, device="cuda", schedule=PROGRESSIVE), [0])
    assert {b.scales for b in progressive} == {(32,)}
