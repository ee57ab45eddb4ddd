"""Sample order, seeds, crop geometry and loader positions: one definition both backends read.

Neither backend imports the other: the DALI graph and the torchvision dataset compute the same shard
layout, the same per-epoch seeds and the same integer eval crop from these pure functions, which is
what lets the parity tests hold them to the same samples and pixels.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from multiscale_dali.pipelines.spec import LoaderSpec

# Seed streams of derived_seed: the reader shuffle and the augmentations draw from independent ones.
SHUFFLE_STREAM, AUGMENT_STREAM, AUTO_AUGMENT_STREAM = 0, 1, 2


def derived_seed(seed: int, epoch: int, *, stream: int) -> int:
    """A 31-bit seed for ``(seed, epoch, stream)``: independent streams, valid for DALI and NumPy."""
    entropy = [seed % 2**32, epoch, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def eval_crop_ratio(fraction: float) -> tuple[int, int]:
    """``fraction`` as a small exact ratio, so every backend computes the same integer crop side."""
    ratio = Fraction(fraction).limit_denominator(1000)
    return ratio.numerator, ratio.denominator


def eval_crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int]:
    """``(top, left, side)`` of the centre square of side ``fraction * min(height, width)``, floored."""
    num, den = eval_crop_ratio(fraction)
    side = max(min(height, width) * num // den, 1)
    return (height - side) // 2, (width - side) // 2, side


def padded_sample_order(num_samples: int, num_shards: int, order: Sequence[int] | None = None) -> list[int]:
    """``order`` (default ``0..n-1``) cycled to ``ceil(n / shards) * shards`` entries.

    Shard ``k`` reads the ``k``-th contiguous block of the result (DALI's reader layout), so every
    shard has exactly ``LoaderSpec.shard_size`` samples; the few padding samples repeat the head, as
    ``DistributedSampler`` does.
    """
    order = list(range(num_samples)) if order is None else list(order)
    if not order:
        return []
    total = math.ceil(num_samples / num_shards) * num_shards
    # Whole copies then a head: list operations in C (this runs over every file at each loader build).
    copies, rest = divmod(total, num_samples)
    return order * copies + order[:rest]


def padding_mask(spec: LoaderSpec, step: int, size: int) -> torch.Tensor | None:
    """Which of the ``size`` samples of batch ``step`` of this shard are real, as a bool tensor.

    Padding is the tail of :func:`padded_sample_order` (positions ``>= len(spec.files)``) whatever the
    shuffle, and shard ``k`` reads the ``k``-th contiguous block, so the position alone tells a padded
    duplicate from its original. ``None`` when the batch holds no padding (almost every batch).
    (Shard sources pad per reader block instead: see ``shard_padding_mask``.)
    """
    first = spec.shard_id * spec.shard_size + step * spec.batch_size
    if first + size <= spec.num_samples:
        return None
    return torch.arange(first, first + size) < spec.num_samples


def shard_padding_mask(real: int, batch_size: int, step: int, size: int) -> torch.Tensor | None:
    """Which samples of batch ``step`` are real when a reader's epoch yields ``real`` real samples first.

    DALI's webdataset reader pads a block only after its last real sample (``pad_last_batch``), so
    the position in the epoch tells padding apart. ``None`` when the batch holds no padding.
    """
    first = step * batch_size
    if first + size <= real:
        return None
    return torch.arange(first, first + size) < real


def resume_fields(spec: LoaderSpec) -> dict[str, Any]:
    """The spec fields a loader state is only valid under, as plain data.

    A step index means the same batches only for the same sample count, batch size, shard layout,
    last-batch rule and schedule, and the same batches only for the same seed; a state saved under
    any other value would resume silently at the wrong place, so loading it is refused.
    """
    fields = {
        "train": spec.train,
        "num_samples": spec.num_samples,
        "batch_size": spec.batch_size,
        "num_shards": spec.num_shards,
        "shard_id": spec.shard_id,
        "drop_last": spec.drop_last,
        "seed": spec.seed,
        "schedule": spec.schedule.to_dict(),
    }
    # Only shard sources add a key, so states saved before shards existed still load.
    return fields if spec.shards is None else fields | {"shards": spec.shards.resume_fields()}


def loader_state(backend: str, spec: LoaderSpec, epoch: int, step: int) -> dict[str, Any]:
    """The backend-independent part of every loader's ``state_dict``."""
    return {"backend": backend, "epoch": epoch, "step": step, "spec": resume_fields(spec)}


def check_loader_state(state: Mapping[str, Any], spec: LoaderSpec, *, backend: str) -> tuple[int, int]:
    """``(epoch, step)`` of a state made by :func:`loader_state`; ``ValueError`` naming what differs."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a loader state is a dict, got {type(state).__name__}")
    if state.get("backend") != backend:
        raise ValueError(f"loader state is from backend {state.get('backend')!r}, this loader is {backend!r}")
    saved = state.get("spec")
    if not isinstance(saved, Mapping):
        raise ValueError("loader state has no 'spec' fields to check it against this loader")
    if "shards" in saved and spec.shards is None:
        raise ValueError("loader state reads a packed directory, this loader reads files")
    for name, value in resume_fields(spec).items():
        if saved.get(name) != value:
            raise ValueError(f"loader state has {name}={saved.get(name)!r}, this loader has {name}={value!r}")
    epoch, step = state.get("epoch"), state.get("step")
    # bool is an int subclass; True as an epoch is a corrupt state, not epoch 1.
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, step)):
        raise ValueError(f"loader state needs integer epoch and step, got {epoch!r} and {step!r}")
    if epoch < 0 or not 0 <= step <= spec.steps_per_epoch:
        raise ValueError(
            f"loader state position epoch={epoch} step={step} is outside 0 <= step <= "
            f"{spec.steps_per_epoch} (batches per epoch)"
        )
    return epoch, step
