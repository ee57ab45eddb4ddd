"""MixUp/CutMix drawn once per batch and applied to every scale."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.mixing import (
    CUTMIX,
    MIXUP,
    NO_MIX,
    MixConfig,
    MixDraw,
    Mixer,
    apply_mix,
    draw_mix,
)
from multiscale_dali.training.soft_targets import smooth_targets

NUM_CLASSES = 5
CUTMIX_ONLY = MixConfig(cutmix_alpha=1.0)
MIXUP_ONLY = MixConfig(mixup_alpha=0.4)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_batch(batch_size: int = 8, scales=(20, 32), *, seed: int = 0, valid=None) -> MultiScaleBatch:
    """Smaller scales are average-pooled versions of a 4x larger base: one image seen at several sizes."""
    gen = _generator(seed)
    base = torch.rand(batch_size, 3, 4 * max(scales), 4 * max(scales), generator=gen)
    images = {s: F.adaptive_avg_pool2d(base, s).contiguous(memory_format=torch.channels_last) for s in scales}
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=gen)
    return MultiScaleBatch(images=images, labels=labels, valid=valid)


def _constant_batch(batch_size: int = 8, scales=(20, 32)) -> MultiScaleBatch:
    """Every pixel of sample ``b`` holds ``b``: where a pixel came from is readable from its value."""
    images = {s: torch.arange(batch_size, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, s, s).clone()
              for s in scales}
    return MultiScaleBatch(images=images, labels=torch.arange(batch_size) % NUM_CLASSES)


def _mix(config: MixConfig, batch: MultiScaleBatch, *, seed: int = 0, task: str = "multiclass"):
    draw = draw_mix(config, batch.batch_size, _generator(seed))
    num_classes = 2 if task == "binary" else NUM_CLASSES
    return apply_mix(draw, batch, smoothing=config.label_smoothing, task=task, num_classes=num_classes)


def _draw_of_kind(config: MixConfig, kind: str, batch_size: int = 8) -> MixDraw:
    """The first seed's draw of ``kind`` whose partner moves at least half of the samples."""
    for seed in range(100):
        draw = draw_mix(config, batch_size, _generator(seed))
        if draw.kind == kind and (draw.partner != torch.arange(batch_size)).sum() >= batch_size // 2:
            return draw
    raise AssertionError(f"no {kind} draw in 100 seeds")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mixup_alpha": -0.1}, "mixup_alpha"),
        ({"cutmix_alpha": float("nan")}, "cutmix_alpha"),
        ({"cutmix_alpha": float("inf")}, "cutmix_alpha"),
        ({"prob": 1.5}, "prob"),
        ({"switch_prob": -0.1}, "switch_prob"),
        ({"prob": True}, "prob"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        MixConfig(**kwargs)
    assert err.value.key == key


def test_mixing_is_on_only_with_an_alpha_and_a_chance():
    assert MIXUP_ONLY.mixing and CUTMIX_ONLY.mixing
    assert not MixConfig().mixing
    assert not MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.0).mixing


def test_mixup_uses_one_partner_and_one_lambda_at_every_scale():
    batch = _smooth_batch(scales=(16, 32))
    draw = _draw_of_kind(MIXUP_ONLY, MIXUP)
    result = apply_mix(draw, batch, smoothing=0.0, task="multiclass", num_classes=NUM_CLASSES)
    assert set(result.lam.values()) == {draw.lam} and 0 < draw.lam < 1
    for scale, images in batch.images.items():
        expected = draw.lam * images + (1 - draw.lam) * images[draw.partner]
        torch.testing.assert_close(result.batch.images[scale], expected)
    # The same mix at every scale: the small mixed image is the large mixed image seen smaller.
    torch.testing.assert_close(F.avg_pool2d(result.batch.images[32], 2).contiguous(),
                               result.batch.images[16].contiguous())


def test_cutmix_pastes_the_same_relative_box_from_the_same_partner_at_every_scale_pixel_exactly():
    batch = _constant_batch(scales=(20, 32))
    draw = _draw_of_kind(CUTMIX_ONLY, CUTMIX)
    result = apply_mix(draw, batch, smoothing=0.0, task="multiclass", num_classes=NUM_CLASSES)
    boxes = {}
    for scale in (20, 32):
        y0, y1, x0, x1 = boxes[scale] = draw.pixel_box(scale, scale)
        inside = torch.zeros(scale, scale, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        for b, mixed in enumerate(result.batch.images[scale]):
            assert torch.all(mixed[:, inside] == float(draw.partner[b]))
            assert torch.all(mixed[:, ~inside] == float(b))
    # One relative box, rounded per resolution: edges agree within half a pixel of each scale.
    for edge in range(4):
        assert abs(boxes[20][edge] / 20 - boxes[32][edge] / 32) <= 0.5 / 20 + 0.5 / 32
    assert draw.box[1] > draw.box[0] and draw.box[3] > draw.box[2]


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lambda_at_each_scale_is_the_share_of_the_image_not_pasted(seed):
    batch = _constant_batch(scales=(7, 20, 32))
    draw = draw_mix(CUTMIX_ONLY, batch.batch_size, _generator(seed))
    result = apply_mix(draw, batch, smoothing=0.0, task="multiclass", num_classes=NUM_CLASSES)
    moved = draw.partner != torch.arange(batch.batch_size)
    one_hot = smooth_targets(batch.labels, smoothing=0.0, task="multiclass", num_classes=NUM_CLASSES)
    for scale, mixed in result.batch.images.items():
        own = torch.arange(batch.batch_size, dtype=torch.float32).view(-1, 1, 1, 1)
        pasted = (mixed != own).float().mean(dim=(1, 2, 3))
        assert torch.allclose(pasted[moved], torch.full_like(pasted[moved], 1 - result.lam[scale]))
        lam = result.lam[scale]
        torch.testing.assert_close(result.targets[scale], lam * one_hot + (1 - lam) * one_hot[draw.partner])
    # The drawn lambda is only nominal: clipping and rounding move the per-scale values off it.
    assert all(0.0 <= lam <= 1.0 for lam in result.lam.values())


@pytest.mark.parametrize("config", [MIXUP_ONLY, CUTMIX_ONLY, MixConfig(0.2, 1.0, label_smoothing=0.1)],
                         ids=["mixup", "cutmix", "both-smoothed"])
def test_multiclass_targets_are_probabilities_at_every_scale(config):
    for seed in range(5):
        result = _mix(config, _smooth_batch(seed=seed), seed=seed)
        for targets in result.targets.values():
            assert targets.shape == (8, NUM_CLASSES) and targets.min() >= 0
            torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))


def test_binary_targets_are_the_mixed_bernoulli_probability():
    batch = MultiScaleBatch(images=_smooth_batch().images, labels=torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]))
    draw = _draw_of_kind(MIXUP_ONLY, MIXUP)
    result = apply_mix(draw, batch, smoothing=0.2, task="binary", num_classes=2)
    y = batch.labels.float() * 0.8 + 0.1
    for targets in result.targets.values():
        assert targets.shape == (8,)
        torch.testing.assert_close(targets, draw.lam * y + (1 - draw.lam) * y[draw.partner])
        assert targets.min() >= 0.1 - 1e-6 and targets.max() <= 0.9 + 1e-6


def test_zero_probability_leaves_the_batch_untouched_and_the_generator_unused():
    batch = _smooth_batch()
    generator = _generator(3)
    state = generator.get_state()
    config = MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1)
    draw = draw_mix(config, batch.batch_size, generator)
    result = apply_mix(draw, batch, smoothing=0.1, task="multiclass", num_classes=NUM_CLASSES)
    assert draw.kind == NO_MIX and torch.equal(generator.get_state(), state)
    assert all(result.batch.images[s] is batch.images[s] for s in batch.images)
    expected = smooth_targets(batch.labels, smoothing=0.1, task="multiclass", num_classes=NUM_CLASSES)
    assert all(torch.equal(t, expected) for t in result.targets.values())
    assert set(result.lam.values()) == {1.0}


def test_mixing_does_not_modify_the_input_and_keeps_channels_last():
    batch = _smooth_batch()
    before = {s: t.clone() for s, t in batch.images.items()}
    for config, kind in ((MIXUP_ONLY, MIXUP), (CUTMIX_ONLY, CUTMIX)):
        result = apply_mix(_draw_of_kind(config, kind), batch, smoothing=0.0, task="multiclass",
                           num_classes=NUM_CLASSES)
        assert all(torch.equal(batch.images[s], before[s]) for s in before)
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in result.batch.images.values())


def test_padding_mask_and_hard_labels_pass_through():
    valid = torch.tensor([True] * 6 + [False] * 2)
    batch = _smooth_batch(valid=valid)
    result = _mix(MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0), batch)
    assert result.batch.valid is valid and result.batch.labels is batch.labels
    assert result.batch.scales == batch.scales


def test_a_draw_for_another_batch_size_is_refused():
    draw = _draw_of_kind(MIXUP_ONLY, MIXUP, batch_size=8)
    with pytest.raises(ValueError, match="pairs"):
        apply_mix(draw, _smooth_batch(batch_size=6), smoothing=0.0, task="multiclass", num_classes=NUM_CLASSES)


def test_draws_are_reproducible_from_the_generator_state():
    config = MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8)
    first = [draw_mix(config, 8, gen) for gen in [_generator(5)] for _ in range(10)]
    again = [draw_mix(config, 8, gen) for gen in [_generator(5)] for _ in range(10)]
    other = [draw_mix(config, 8, gen) for gen in [_generator(6)] for _ in range(10)]

    def key(d):
        return d.kind, d.lam, d.box, None if d.partner is None else tuple(d.partner.tolist())

    assert [key(d) for d in first] == [key(d) for d in again]
    assert [key(d) for d in first] != [key(d) for d in other]


def test_mixer_state_round_trip_through_a_weights_only_checkpoint_resumes_the_same_mixes():
    config = MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    mixer = Mixer(config, task="multiclass", num_classes=NUM_CLASSES, seed=1)
    for seed in range(3):
        mixer(_smooth_batch(seed=seed))
    buffer = io.BytesIO()
    torch.save({"mixer": mixer.state_dict()}, buffer)
    buffer.seek(0)
    resumed = Mixer(config, task="multiclass", num_classes=NUM_CLASSES, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["mixer"])
    for seed in range(3, 8):
        batch = _smooth_batch(seed=seed)
        want, got = mixer(batch), resumed(batch)
        assert want.lam == got.lam
        assert all(torch.equal(want.batch.images[s], got.batch.images[s]) for s in batch.images)
        assert all(torch.equal(want.targets[s], got.targets[s]) for s in batch.images)


def test_mixer_refuses_a_state_that_is_not_its_own():
    mixer = Mixer(MIXUP_ONLY, task="multiclass", num_classes=NUM_CLASSES, seed=0)
    with pytest.raises(ValueError, match="generator"):
        mixer.load_state_dict({"generator": [1, 2, 3]})


def test_mixer_checks_the_task_when_built():
    with pytest.raises(ValueError, match="task"):
        Mixer(MIXUP_ONLY, task="auto", num_classes=NUM_CLASSES, seed=0)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_lambda_follows_the_symmetric_beta_distribution(alpha):
    generator = _generator(11)
    lams = torch.tensor([draw_mix(MixConfig(mixup_alpha=alpha), 2, generator).lam for _ in range(4000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws pin both to a few percent.
    assert abs(float(lams.mean()) - 0.5) < 0.03
    assert float(lams.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)


def test_prob_and_switch_prob_set_how_often_and_how_batches_mix():
    generator = _generator(12)
    config = MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25)
    kinds = [draw_mix(config, 4, generator).kind for _ in range(4000)]
    mixed = sum(k != NO_MIX for k in kinds)
    assert mixed / len(kinds) == pytest.approx(0.6, abs=0.03)
    assert sum(k == CUTMIX for k in kinds) / mixed == pytest.approx(0.25, abs=0.03)


def test_cutmix_box_side_follows_the_drawn_lambda_before_clipping():
    for seed in range(20):
        draw = draw_mix(CUTMIX_ONLY, 4, _generator(seed))
        top, bottom, left, right = draw.box
        side = math.sqrt(1 - draw.lam)
        assert bottom - top <= side + 1e-12 and right - left <= side + 1e-12
        assert 0.0 <= top <= bottom <= 1.0 and 0.0 <= left <= right <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixing_on_the_gpu_matches_the_cpu():
    batch = _smooth_batch()
    cuda = MultiScaleBatch(images={s: t.cuda() for s, t in batch.images.items()}, labels=batch.labels.cuda())
    for config, kind in ((MIXUP_ONLY, MIXUP), (CUTMIX_ONLY, CUTMIX)):
        draw = _draw_of_kind(config, kind)
        on_cpu = apply_mix(draw, batch, smoothing=0.1, task="multiclass", num_classes=NUM_CLASSES)
        on_gpu = apply_mix(draw, cuda, smoothing=0.1, task="multiclass", num_classes=NUM_CLASSES)
        for s in batch.images:
            torch.testing.assert_close(on_gpu.batch.images[s].cpu(), on_cpu.batch.images[s])
            torch.testing.assert_close(on_gpu.targets[s].cpu(), on_cpu.targets[s])
