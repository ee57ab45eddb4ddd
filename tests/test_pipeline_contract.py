"""The batch contract, held on every backend by one test."""

import importlib.util

import pytest
import torch

from conftest import make_spec, run_loader
from multiscale_dali.loaders import build_loader

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
