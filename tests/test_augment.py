"""The backend-neutral augmentation spec and its torchvision implementation."""

from __future__ import annotations

import pickle

import pytest
import torch

from conftest import synthetic_image
from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.augment import AutoAugmentSpec, build_tv_auto_augment
from multiscale_dali.pipelines.torchvision_backend import resize_square

POLICIES = [AutoAugmentSpec("trivial"), AutoAugmentSpec("rand", 2, 9), AutoAugmentSpec("auto")]


def _image(seed: int, side: int = 64) -> torch.Tensor:
    return torch.from_numpy(synthetic_image(side, side, seed=seed)).permute(2, 0, 1).contiguous()


def _mean_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"policy": "randaugment"}, "auto_augment"),
        ({"policy": "rand", "rand_n": 0}, "rand_n"),
        ({"policy": "rand", "rand_m": 31}, "rand_m"),
        ({"policy": "rand", "rand_m": -1}, "rand_m"),
        ({"policy": "rand", "rand_m": 9.5}, "rand_m"),
        ({"policy": "rand", "rand_n": True}, "rand_n"),
    ],
)
def test_spec_rejects_bad_values_naming_the_field_and_the_allowed_range(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AutoAugmentSpec(**kwargs)
    assert err.value.key == field
    assert isinstance(err.value, ValueError)
    assert any(hint in err.value.message for hint in ("0..30", ">= 1", "none, trivial, rand, auto"))


def test_spec_accepts_the_extremes_of_the_magnitude_range():
    assert AutoAugmentSpec("rand", 1, 0).enabled and AutoAugmentSpec("rand", 4, 30).enabled
    assert not AutoAugmentSpec().enabled


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: s.policy)
def test_draw_is_a_pure_function_of_the_seed_and_leaves_the_global_generator_alone(spec):
    augment = build_tv_auto_augment(spec)
    image = _image(0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = augment(image, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # whatever the caller does with the global generator in between
    assert torch.equal(augment(image, seed=5), first)
    assert first.dtype == torch.uint8 and first.shape == image.shape


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: s.policy)
def test_different_samples_get_different_draws_and_most_are_changed(spec):
    augment = build_tv_auto_augment(spec)
    image = _image(1)
    outputs = [augment(image, seed=seed) for seed in range(16)]
    changed = [_mean_gap(out, image) > 1.0 for out in outputs]
    distinct = {out.numpy().tobytes() for out in outputs}
    assert sum(changed) > len(outputs) // 2
    assert len(distinct) > len(outputs) // 2


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: s.policy)
def test_scales_resized_from_the_augmented_largest_all_show_the_same_draw(spec):
    """The loader's cascade: augment the largest scale once, resize the smaller ones from it."""
    augment = build_tv_auto_augment(spec)
    shown = 0
    for seed in range(8):
        largest = resize_square(_image(seed, side=90), 64)
        augmented = augment(largest, seed=seed)
        small = resize_square(augmented, 32)
        change_large = _mean_gap(augmented, largest)
        change_small = _mean_gap(small, resize_square(largest, 32))
        # Downscaling only averages neighbouring pixels: whatever the draw did to the largest scale is
        # still there, of about the same size, at the small one (and nothing where it did nothing).
        assert change_small == pytest.approx(change_large, rel=0.5, abs=1.0)
        shown += change_large > 1.0
    assert shown > 0


def test_augmenting_large_then_resizing_differs_from_augmenting_each_scale_separately():
    """Why the order matters: TrivialAugmentWide shifts by absolute pixels, so per-scale draws disagree."""
    augment = build_tv_auto_augment(AutoAugmentSpec("trivial"))
    mismatched = 0
    for seed in range(12):
        largest = resize_square(_image(seed, side=90), 64)
        cascade = resize_square(augment(largest, seed=seed), 32)
        separate = augment(resize_square(largest, 32), seed=seed)
        mismatched += _mean_gap(cascade, separate) > 2.0
    assert mismatched > 0


def test_policy_none_returns_the_image_itself():
    image = _image(2)
    assert build_tv_auto_augment(AutoAugmentSpec("none"))(image, seed=0) is image


def test_the_augmentation_survives_pickling_for_dataloader_workers():
    augment = build_tv_auto_augment(AutoAugmentSpec("rand", 2, 9))
    image = _image(3)
    assert torch.equal(pickle.loads(pickle.dumps(augment))(image, seed=9), augment(image, seed=9))


@pytest.mark.parametrize("bad", [torch.zeros(3, 8, 8), torch.zeros(8, 8, 3, dtype=torch.uint8)])
def test_only_uint8_chw_images_are_accepted(bad):
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        build_tv_auto_augment(AutoAugmentSpec("trivial"))(bad, seed=0)
