import math
import pickle

import pytest

from multiscale_dali.pipelines.schedule import (
    ScaleSchedule,
    constant_schedule,
    linear_ramp_schedule,
    parse_steps,
    stepwise_schedule,
)


def test_constant_schedule_gives_every_scale_every_epoch():
    schedule = constant_schedule([64, 96, 128])
    assert schedule.is_constant
    assert all(schedule.scales_at(e) == (64, 96, 128) for e in range(10))


def test_stepwise_schedule_holds_each_scale_until_the_next_step():
    schedule = stepwise_schedule({0: 64, 3: 96, 6: 128})
    assert schedule.describe(8) == [(64,)] * 3 + [(96,)] * 3 + [(128,)] * 2
    assert schedule.final_scales == (128,)
    assert schedule.all_scales == (64, 96, 128)


def test_progressive_schedule_snaps_to_multiple_of_32():
    schedule = linear_ramp_schedule(min_scale=64, max_scale=256, epochs=20, start_ramp=2, end_ramp=18)
    scales = [s for (s,) in schedule.describe(20)]
    assert scales[0] == 64 and scales[-1] == 256
    assert all(s % 32 == 0 for s in scales)
    assert scales == sorted(scales), "a ramp never shrinks"
    assert len(set(scales)) > 3, "the ramp visits intermediate scales"


def test_linear_ramp_keeps_min_before_start_and_max_after_end():
    schedule = linear_ramp_schedule(min_scale=160, max_scale=192, epochs=16, start_ramp=4, end_ramp=12)
    scales = [s for (s,) in schedule.describe(16)]
    assert scales[:5] == [160] * 5
    assert scales[12:] == [192] * 4


def test_ramp_with_unsnappable_bounds_stays_within_them():
    schedule = linear_ramp_schedule(min_scale=70, max_scale=130, epochs=9, multiple=32)
    assert all(70 <= s <= 130 for (s,) in schedule.describe(9))


def test_schedule_round_trips_through_its_plain_dict():
    schedule = stepwise_schedule({0: 64, 2: 96, 5: 128})
    assert ScaleSchedule.from_dict(schedule.to_dict()) == schedule


def test_schedule_is_picklable_for_loader_workers_and_dali_callbacks():
    schedule = stepwise_schedule({0: 64, 2: 128})
    assert pickle.loads(pickle.dumps(schedule)) == schedule


@pytest.mark.parametrize(
    "stages, message",
    [
        (((1, (64,)),), "epoch 0"),
        (((0, (64,)), (0, (96,))), "strictly increasing"),
        (((0, (64, 96)), (2, (128,))), "same number of scales"),
        (((0, (96, 64)),), "strictly increasing"),
        (((0, (0,)),), "positive"),
    ],
)
def test_invalid_schedules_are_rejected_with_the_reason(stages, message):
    with pytest.raises(ValueError, match=message):
        ScaleSchedule(stages=stages)


def test_parse_steps_names_the_bad_part():
    assert parse_steps("0:64, 3:96") == {0: 64, 3: 96}
    with pytest.raises(ValueError, match="'3-96'"):
        parse_steps("0:64,3-96")


def test_negative_epoch_is_an_error():
    with pytest.raises(ValueError, match="epoch"):
        constant_schedule([64]).scales_at(-1)


def test_ramp_with_levels_visits_only_the_listed_scales_in_order():
    schedule = linear_ramp_schedule(min_scale=64, max_scale=160, epochs=12, levels=(64, 96, 160))
    scales = [s for (s,) in schedule.describe(12)]
    assert set(scales) == {64, 96, 160}
    assert scales == sorted(scales) and scales[0] == 64 and scales[-1] == 160


def test_default_ramp_reaches_the_final_scale_within_the_first_quarter_and_stays():
    """The final scale must get most epochs, while the learning rate is high (docs/results.md)."""
    for epochs in (4, 8, 30, 88):
        scales = [s for (s,) in linear_ramp_schedule(min_scale=16, max_scale=32, epochs=epochs,
                                                     levels=(16, 24, 32)).describe(epochs)]
        first_final = scales.index(32)
        assert scales[0] == 16 and first_final <= math.ceil(epochs / 4)
        assert scales[first_final:] == [32] * (epochs - first_final)
        assert scales == sorted(scales)
