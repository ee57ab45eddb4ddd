"""Automatic augmentation inside a DALI graph, on CPU operators (``device_id=None``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from conftest import make_jpeg_folder, synthetic_image  # noqa: E402
from multiscale_dali.pipelines.augment import AutoAugmentSpec  # noqa: E402
from multiscale_dali.pipelines.dali.augment import auto_augment  # noqa: E402

BATCH = 16
LARGE, SMALL = 64, 32
IMAGES = [synthetic_image(LARGE, LARGE, seed=i) for i in range(BATCH)]


def _run_once(spec: AutoAugmentSpec, *, seed: int = 7, conditionals: bool = True) -> list[np.ndarray]:
    """``(input, augmented large, small resized from it, small resized from the input)`` for one batch."""

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=seed, enable_conditionals=conditionals)
    def pipe():
        images = fn.external_source(source=lambda: IMAGES, batch=True, layout="HWC")
        large = auto_augment(images, spec, shape=(LARGE, LARGE))
        return images, large, fn.resize(large, size=[SMALL, SMALL]), fn.resize(images, size=[SMALL, SMALL])

    built = pipe()
    built.build()
    return [np.array(out.as_tensor()) for out in built.run()]


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: does ``a`` differ from ``b`` by more than a resize kernel's rounding?"""
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=(1, 2, 3)) > 1.0


@pytest.mark.parametrize("spec", [AutoAugmentSpec("trivial"), AutoAugmentSpec("rand", 2, 9), AutoAugmentSpec("auto")],
                         ids=lambda s: s.policy)
def test_policy_runs_on_cpu_and_changes_most_samples_with_one_draw_shared_by_every_scale(spec):
    images, large, small, small_plain = _run_once(spec)
    assert large.shape == images.shape and large.dtype == np.uint8
    changed = _changed(large, images)
    assert changed.mean() > 0.5
    # The small scale is the augmented large one resized: an independent resize agrees within the
    # kernels' disagreement (measured: per-image mean <= 0.3 levels, max 10 at the sharp edges some
    # operations make), while the augmentation moves a changed image by tens of levels on average.
    reference = F.resize(torch.from_numpy(large).permute(0, 3, 1, 2), [SMALL, SMALL], antialias=True)
    gap = (reference.permute(0, 2, 3, 1).float() - torch.from_numpy(small).float()).abs()
    assert gap.amax() <= 16 and gap.mean(dim=(1, 2, 3)).max() <= 1.0
    assert (_changed(small, small_plain) == changed).mean() >= 0.9


def test_draws_follow_the_pipeline_seed():
    spec = AutoAugmentSpec("trivial")
    first, again, other = _run_once(spec, seed=3)[1], _run_once(spec, seed=3)[1], _run_once(spec, seed=4)[1]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_policy_none_adds_nothing_to_the_graph():
    images, large, _, _ = _run_once(AutoAugmentSpec("none"), conditionals=False)
    assert np.array_equal(images, large)


def test_a_pipeline_without_conditionals_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="enable_conditionals=True"):
        _run_once(AutoAugmentSpec("rand"), conditionals=False)


@pytest.mark.parametrize("policy", ["rand", "auto"])
def test_relative_translations_need_the_image_shape(policy):
    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        images = fn.external_source(source=lambda: IMAGES[:2], batch=True, layout="HWC")
        return auto_augment(images, AutoAugmentSpec(policy))

    with pytest.raises(ValueError, match="shape"):
        pipe().build()


def test_checkpointed_pipeline_replays_augmented_batches_with_a_per_batch_size_node(tmp_path: Path):
    """The resume contract of the DALI loader holds with augmentation on and a progressive size node."""
    files, _ = make_jpeg_folder(tmp_path, classes=2, per_class=6)

    def sizes(info):
        side = 48 if info.iteration < 3 else 64  # a progressive schedule switching at batch 3
        return [np.array([side, side], dtype=np.float32)] * 4

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=11, enable_conditionals=True,
                  enable_checkpointing=True)
    def pipe():
        encoded, _ = fn.readers.file(files=files, random_shuffle=True, name="Reader")
        size = fn.external_source(source=sizes, batch=True, batch_info=True)
        large = fn.resize(fn.decoders.image(encoded, device="cpu"), size=size)
        large = auto_augment(large, AutoAugmentSpec("rand", 2, 9), shape=size)
        return large, fn.resize(large, size=[24, 24])

    original = pipe()
    original.build()
    for _ in range(2):
        original.run()
    checkpoint = original.checkpoint()
    expected = [[np.array(o.as_tensor()) for o in original.run()] for _ in range(3)]
    restored = pipe(checkpoint=checkpoint)
    restored.build()
    replayed = [[np.array(o.as_tensor()) for o in restored.run()] for _ in range(3)]
    assert [e[0].shape[1] for e in expected] == [48, 64, 64]
    for want, got in zip(expected, replayed):
        assert all(np.array_equal(w, g) for w, g in zip(want, got))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_images_augment_with_a_cpu_size_node(jpeg_folder):
    """The production placement: mixed decode, GPU images, the [s, s] size node on the CPU."""
    files, _ = jpeg_folder

    @pipeline_def(batch_size=8, num_threads=1, device_id=0, seed=2, enable_conditionals=True)
    def pipe():
        encoded, _ = fn.readers.file(files=files)
        size = fn.external_source(source=lambda: [np.array([LARGE, LARGE], dtype=np.float32)] * 8, batch=True)
        large = fn.resize(fn.decoders.image(encoded, device="mixed"), size=size)
        return large, auto_augment(large, AutoAugmentSpec("rand", 2, 9), shape=size)

    built = pipe()
    built.build()
    plain, augmented = [np.array(out.as_cpu().as_tensor()) for out in built.run()]
    assert augmented.shape == (8, LARGE, LARGE, 3)
    assert _changed(augmented, plain).mean() > 0.5
