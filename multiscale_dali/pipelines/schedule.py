"""Which scales each epoch trains on: a pure function of the epoch, nothing stateful.

Both backends consult the schedule from inside their loaders (DALI from an ``external_source``
callback that runs ahead of the trainer, torchvision from the sampler), so a schedule must be a pure,
picklable value: the scales of epoch ``e`` may be asked for before epoch ``e - 1`` has finished.

Every epoch of one schedule has the same number of scales; that keeps the DALI graph fixed, and
only the sizes flow in as data. A multi-scale run is a constant schedule of k scales; a progressive
run is a schedule of one scale that grows.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


SCALES_EXAMPLE = "64,96,128"
# The default progressive ramp reaches the final scale after this fraction of the epochs and stays
# there for the rest. Why so early: the epochs at the final scale are what its accuracy is made of, and
# they must come while the cosine learning rate is still high (0.85 of its peak at 25% of the run).
# The earlier default (FFCV's shape, a ramp over the middle half) reached 32 px in the last two of
# eight epochs at lr ~1e-4 and ended 29 points below single-scale training on held-out digits; see
# docs/results.md for what this default costs and saves.
RAMP_END_FRACTION = 0.25
# The largest scale accepted: one 16384 px RGB image is 768 MiB of pixels before any model sees it,
# so anything above is a typo (an extra digit), refused here rather than as an allocation failure.
MAX_SCALE = 16384


def _scale(item: object, value: object) -> int:
    """One scale of ``value``: an int (not a bool, not a float such as 16.5) or the text of one."""
    try:
        if isinstance(item, str):
            return int(item.strip())
        if isinstance(item, bool):
            raise TypeError
        return operator.index(item)  # ints and NumPy ints; floats are refused, not truncated
    except (TypeError, ValueError):
        raise ValueError(f"{item!r} in {value!r} is not a whole number of pixels; "
                         f"scales are positive integers, e.g. {SCALES_EXAMPLE}") from None


def parse_scales(value: str | Iterable[int]) -> tuple[int, ...]:
    """``"64,96,128"`` or ``[64, 96, 128]`` -> ``(64, 96, 128)``: the one rule for a list of scales.

    Scales are positive integers in strictly increasing order (each scale once). Every caller (the
    command line, TOML recipes, checkpoints, the schedules here) parses with this function, so a bad
    list is refused the same way wherever it comes from; the ``ValueError`` names the value.
    """
    if isinstance(value, str):
        items: list[object] = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise ValueError(f"{value!r} is not a list of scales, e.g. {SCALES_EXAMPLE}")
    scales = tuple(_scale(item, value) for item in items)
    if not scales:
        raise ValueError(f"{value!r} holds no scale; give at least one, e.g. {SCALES_EXAMPLE}")
    if any(s <= 0 for s in scales):
        raise ValueError(f"{value!r}: scales must be positive, got {min(scales)}")
    if max(scales) > MAX_SCALE:
        raise ValueError(f"{value!r}: scales are at most {MAX_SCALE} px, got {max(scales)}")
    if list(scales) != sorted(set(scales)):
        raise ValueError(f"{value!r}: scales must be strictly increasing (each once, smallest first), "
                         f"e.g. {SCALES_EXAMPLE}")
    return scales


def _check_scales(scales: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        return parse_scales(scales)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


@dataclass(frozen=True)
class ScaleSchedule:
    """Stages ``(start_epoch, scales)``: the scales of the last stage starting at or before an epoch."""

    stages: tuple[tuple[int, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a scale schedule needs at least one stage")
        starts = [start for start, _ in self.stages]
        if starts[0] != 0:
            raise ValueError(f"the first stage must start at epoch 0, got epoch {starts[0]}")
        if starts != sorted(set(starts)):
            raise ValueError(f"stage start epochs must be strictly increasing, got {starts}")
        widths = {len(_check_scales(scales, f"stage at epoch {start}")) for start, scales in self.stages}
        if len(widths) != 1:
            raise ValueError(
                "every stage of a schedule must have the same number of scales, got "
                f"{[list(scales) for _, scales in self.stages]}"
            )

    @property
    def num_scales(self) -> int:
        return len(self.stages[0][1])

    @property
    def is_constant(self) -> bool:
        return len({scales for _, scales in self.stages}) == 1

    @property
    def final_scales(self) -> tuple[int, ...]:
        return self.stages[-1][1]

    @property
    def all_scales(self) -> tuple[int, ...]:
        """Every scale the schedule ever uses, ascending."""
        return tuple(sorted({s for _, scales in self.stages for s in scales}))

    def scales_at(self, epoch: int) -> tuple[int, ...]:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        index = bisect.bisect_right([start for start, _ in self.stages], epoch) - 1
        return self.stages[index][1]

    def describe(self, epochs: int) -> list[tuple[int, ...]]:
        return [self.scales_at(e) for e in range(epochs)]

    def to_dict(self) -> dict:
        return {"stages": [[start, list(scales)] for start, scales in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ScaleSchedule":
        """The inverse of :meth:`to_dict` (schedules stored in checkpoints and config.json)."""
        return cls(stages=tuple((int(start), tuple(int(s) for s in scales)) for start, scales in data["stages"]))


def constant_schedule(scales: Iterable[int]) -> ScaleSchedule:
    """All scales every epoch: the multi-scale trainer's schedule."""
    return ScaleSchedule(stages=((0, _check_scales(list(scales), "scales")),))


def stepwise_schedule(steps: Mapping[int, int]) -> ScaleSchedule:
    """Explicit ``{start_epoch: scale}`` steps, one scale per epoch, e.g. ``{0: 64, 3: 96, 6: 128}``."""
    if not steps:
        raise ValueError("a stepwise schedule needs at least one epoch:scale step")
    ordered = sorted((int(e), int(s)) for e, s in steps.items())
    stages: list[tuple[int, tuple[int, ...]]] = []
    for epoch, scale in ordered:
        if stages and stages[-1][1] == (scale,):
            continue  # a repeated scale is not a new stage
        stages.append((epoch, (scale,)))
    return ScaleSchedule(stages=tuple(stages))


def linear_ramp_schedule(
    *,
    min_scale: int,
    max_scale: int,
    epochs: int,
    start_ramp: int | None = None,
    end_ramp: int | None = None,
    multiple: int = 32,
    levels: Sequence[int] | None = None,
) -> ScaleSchedule:
    """A ramp: ``min_scale`` until ``start_ramp``, linear to ``max_scale`` at ``end_ramp``, then ``max_scale``.

    Intermediate scales are rounded to a multiple of ``multiple`` (fewer distinct shapes: fewer
    cuDNN autotunes and torch.compile recompiles) and clamped to ``[min_scale, max_scale]``; with
    ``levels``, they snap to the nearest of those scales instead. Defaults: the ramp starts at epoch 0
    and ends after ``RAMP_END_FRACTION`` of the epochs (rounded up), so most of the run, and the part
    with a high learning rate, is spent at the final scale (Composer's ``finetune_fraction`` idea).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got min={min_scale} max={max_scale}")
    start = 0 if start_ramp is None else int(start_ramp)
    end = max(start, math.ceil(RAMP_END_FRACTION * epochs)) if end_ramp is None else int(end_ramp)
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start_ramp <= end_ramp, got start={start} end={end}")
    steps: dict[int, int] = {}
    for epoch in range(epochs):
        if epoch >= end:
            scale = max_scale
        elif epoch <= start:
            scale = min_scale
        else:
            raw = min_scale + (max_scale - min_scale) * (epoch - start) / (end - start)
            if levels:
                scale = min(levels, key=lambda level: abs(level - raw))
            else:
                scale = int(round(raw / multiple)) * multiple
        steps[epoch] = min(max(scale, min_scale), max_scale)
    return stepwise_schedule(steps)


def parse_steps(text: str) -> dict[int, int]:
    """Parse ``"0:64,3:96,6:128"`` into ``{0: 64, 3: 96, 6: 128}`` with an error naming the bad part."""
    steps: dict[int, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        epoch, sep, scale = part.partition(":")
        try:
            if not sep:
                raise ValueError
            start, size = int(epoch), int(scale)
        except ValueError:
            raise ValueError(f"bad schedule step {part!r}: expected EPOCH:SCALE, e.g. 0:64,3:96") from None
        if start in steps:  # the later one would silently replace the earlier
            raise ValueError(f"epoch {start} has two steps ({start}:{steps[start]} and {part}); "
                             "give one scale per epoch")
        steps[start] = size
    return steps
