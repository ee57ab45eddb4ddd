"""DALI (CPU) and torchvision hold to one contract: same keys, shapes, dtypes, labels and pixels.

Pixel tolerance, measured on these smooth synthetic JPEGs (DALI 2.4.0, torchvision 0.29):

* decoding is bit-identical (both use libjpeg-turbo; DALI's ROI decode of the centre square equals
  cropping a full decode), and the crop box is the same integer box in both;
* the antialiased bilinear resizes differ: DALI filters in float and rounds once, torchvision's uint8
  path uses fixed-point weights. A single resize of the same uint8 crop differs by at most 6 levels
  (at a 4x downscale to 24 px) and by 0.12-0.25 levels on average; end to end the largest difference
  is 5 levels and the per-image mean at most 0.28.

So a pixel may differ by up to ``MAX_LEVELS`` and an image on average by ``MEAN_LEVELS``. A one-pixel
error in the crop box (offset or side) costs at least 2.7 levels per-image mean and 28 levels max on
the same images, so the tolerance still catches any geometry disagreement.
"""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from conftest import make_jpeg_folder, make_spec, run_loader, synthetic_image, to_uint8  # noqa: E402
from multiscale_dali.pipelines.dali.loader import DaliLoader  # noqa: E402
from multiscale_dali.pipelines.spec import LoaderSpec  # noqa: E402
from multiscale_dali.pipelines.schedule import constant_schedule, stepwise_schedule  # noqa: E402
from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader  # noqa: E402

MAX_LEVELS = 8
MEAN_LEVELS = 1.0
_spec = functools.partial(make_spec, schedule=constant_schedule([24, 48, 64]))


def _both(spec: LoaderSpec, epochs) -> tuple[list[list], list[list]]:
    return run_loader(DaliLoader, spec, epochs), run_loader(TorchvisionLoader, spec, epochs)


def _assert_same_contract(dali_batches, torch_batches) -> None:
    assert len(dali_batches) == len(torch_batches)
    for d, t in zip(dali_batches, torch_batches):
        assert d.scales == t.scales
        assert torch.equal(d.labels, t.labels) and d.labels.dtype == t.labels.dtype
        for scale in d.scales:
            assert d.images[scale].shape == t.images[scale].shape
            assert d.images[scale].dtype == t.images[scale].dtype
            assert d.images[scale].stride() == t.images[scale].stride()


def _assert_pixels_close(dali_batches, torch_batches) -> None:
    for d, t in zip(dali_batches, torch_batches):
        for scale in d.scales:
            diff = (to_uint8(d.images[scale]).float() - to_uint8(t.images[scale]).float()).abs()
            assert diff.amax() <= MAX_LEVELS, f"scale {scale}: max difference {diff.amax()}"
            worst_mean = diff.mean(dim=(1, 2, 3)).max()
            assert worst_mean <= MEAN_LEVELS, f"scale {scale}: per-image mean difference {worst_mean}"


def test_eval_outputs_match_in_keys_shapes_labels_and_pixels(tmp_path):
    files, labels = make_jpeg_folder(tmp_path, classes=3, per_class=3)  # 9 files: uneven last batch
    dali, tv = _both(_spec(files, labels), [0])
    _assert_same_contract(dali[0], tv[0])
    _assert_pixels_close(dali[0], tv[0])


def test_progressive_eval_outputs_match_at_every_epoch(jpeg_folder):
    files, labels = jpeg_folder
    dali, tv = _both(_spec(files, labels, schedule=stepwise_schedule({0: 32, 1: 48})), range(2))
    for d, t in zip(dali, tv):
        _assert_same_contract(d, t)
        _assert_pixels_close(d, t)


def test_non_rgb_inputs_match_after_conversion_to_rgb(tmp_path):
    files = []
    for i, (mode, suffix) in enumerate([("L", ".jpg"), ("RGBA", ".png"), ("P", ".png"), ("RGB", ".png")]):
        path = tmp_path / f"image{i}{suffix}"
        Image.fromarray(synthetic_image(90, 70, seed=i)).convert(mode).save(path)
        files.append(str(path))
    dali, tv = _both(_spec(files, [0, 1, 0, 1]), [0])
    _assert_same_contract(dali[0], tv[0])
    _assert_pixels_close(dali[0], tv[0])


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharded_eval_shards_hold_the_same_samples_in_the_same_steps(tmp_path, drop_last):
    files, _ = make_jpeg_folder(tmp_path, classes=1, per_class=11)
    ids = list(range(len(files)))
    for shard_id in range(2):
        spec = _spec(files, ids, num_shards=2, shard_id=shard_id, batch_size=4, drop_last=drop_last)
        dali, tv = _both(spec, [0])
        assert len(dali[0]) == len(tv[0]) == spec.steps_per_epoch
        _assert_same_contract(dali[0], tv[0])


def test_train_outputs_share_the_contract_but_not_the_random_draws(jpeg_folder):
    files, labels = jpeg_folder
    spec = _spec(files, labels, train=True, drop_last=True, batch_size=3)
    dali, tv = _both(spec, range(2))
    for d, t in zip(dali, tv):
        assert len(d) == len(t) == spec.steps_per_epoch == 2
        for db, tb in zip(d, t):
            assert db.scales == tb.scales and db.labels.shape == tb.labels.shape
            assert all(db.images[s].shape == tb.images[s].shape for s in db.scales)


def _pack_into_val(tmp_path, files, labels):
    """``files`` as the val split of a pack (a few go to train, which the test does not read)."""
    from multiscale_dali.data.discovery import DatasetSplits, SplitFiles
    from multiscale_dali.data.shards import pack_dataset

    splits = DatasetSplits(root=str(tmp_path), classes=tuple(f"class_{k}" for k in range(max(labels) + 1)),
                           train=SplitFiles(files=tuple(files[:2]), labels=tuple(labels[:2])),
                           val=SplitFiles(files=tuple(files), labels=tuple(labels)),
                           test=SplitFiles(files=(), labels=()), explicit_splits=True)
    return pack_dataset(splits=splits, out=tmp_path / "pack", seed=5, shard_bytes=16 * 1024, workers=1)


def test_eval_outputs_on_a_pack_match_as_on_folders(tmp_path):
    from multiscale_dali.pipelines.spec import ShardSource
    from multiscale_dali.pipelines.torchvision_shards import TorchvisionShardLoader

    files, labels = make_jpeg_folder(tmp_path / "images", classes=3, per_class=3)  # 9: uneven last batch
    manifest = _pack_into_val(tmp_path, files, labels)
    source = ShardSource(manifest=manifest, split="val")
    for shard_id in range(2):
        # Two DataLoader workers: their batches still come out in the pack's order, as DALI reads it.
        spec = _spec((), (), shards=source, num_shards=2, shard_id=shard_id, num_workers=2)
        dali = run_loader(DaliLoader, spec, [0, 1])
        tv = run_loader(TorchvisionShardLoader, spec, [0, 1])
        for d, t in zip(dali, tv):
            assert len(d) == len(t) == spec.steps_per_epoch
            _assert_same_contract(d, t)
            _assert_pixels_close(d, t)
            assert [getattr(b, "valid", None) is None for b in d] == [getattr(b, "valid", None) is None for b in t]
        assert [b.labels.tolist() for b in dali[0]] == [b.labels.tolist() for b in dali[1]]  # eval: every epoch alike
