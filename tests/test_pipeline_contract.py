"""The batch contract, held on every backend by one test."""

import importlib.util

import pytest
import torch

from conftest import make_jpeg_folder, make_spec, run_loader, to_uint8
from multiscale_dali.pipelines.factory import build_loader
from multiscale_dali.pipelines.schedule import constant_schedule

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None, reason="DALI not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_batches_have_every_scale_as_normalised_float_and_file_order_labels(jpeg_folder, backend):
    files, labels = jpeg_folder
    spec = make_spec(files, labels, batch_size=3)
    (batches,) = run_loader(lambda s: build_loader(s, backend=backend), spec, [0])
    assert len(batches) == spec.steps_per_epoch == 3
    assert [b.batch_size for b in batches] == [3, 3, 2]
    for batch in batches:
        assert batch.scales == (32, 48, 64)
        assert batch.labels.dtype == torch.int64
        for scale, images in batch.images.items():
            assert images.dtype == torch.float32
            assert tuple(images.shape) == (batch.batch_size, 3, scale, scale)
            assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([b.labels for b in batches]).tolist() == labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shuffle_differs_across_epochs_and_repeats_for_a_fixed_seed(tmp_path, backend):
    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=12)
    ids = list(range(len(files)))  # label = file index, to read the order back

    def orders(seed):
        spec = make_spec(files, ids, train=True, seed=seed, schedule=constant_schedule([16]), num_workers=0)
        epochs = run_loader(lambda s: build_loader(s, backend=backend), spec, range(2))
        return [torch.cat([b.labels for b in batches]).tolist() for batches in epochs]

    first = orders(seed=7)
    assert first == orders(seed=7)
    assert first[0] != first[1]
    assert first != orders(seed=8)
    assert all(sorted(order) == ids for order in first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_auto_augment_draws_once_per_sample_and_every_scale_shows_that_draw(tmp_path, backend, policy):
    from multiscale_dali.pipelines.augment import AutoAugmentSpec
    from multiscale_dali.pipelines.torchvision_backend import resize_square

    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=16)
    ids = list(range(len(files)))

    def epoch_images(augment):
        spec = make_spec(files, ids, train=True, seed=3, schedule=constant_schedule([24, 48]), num_workers=0,
                         batch_size=16, auto_augment=AutoAugmentSpec(policy=augment))
        (batches,) = run_loader(lambda s: build_loader(s, backend=backend), spec, [0])
        (batch,) = batches
        order = batch.labels.argsort()
        return {s: to_uint8(batch.images[s][order]) for s in batch.scales}

    plain, augmented = epoch_images("none"), epoch_images(policy)
    # The smaller scale is the largest one (as augmented) resized: one draw serves every scale.
    for images in (plain, augmented):
        resized = torch.stack([resize_square(img, 24) for img in images[48]]).float()
        assert (resized - images[24].float()).abs().mean() < 2.0
    # The augmentation changed most samples (a draw can be an identity op, so not necessarily all).
    changed = [(a.float() - p.float()).abs().mean() > 1.0 for a, p in zip(augmented[48], plain[48])]
    assert sum(changed) >= len(changed) // 2
