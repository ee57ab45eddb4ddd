"""Gradient accumulation: ``accum_steps`` loader batches (micro-batches) per optimiser step.

The loader's batch is the micro-batch, as in timm's ``--grad-accum-steps``: a step adds up the
gradients of K micro-batches, each loss scaled by 1/K, so it equals one batch K times the size for a
model whose samples do not interact (BatchNorm normalises each micro-batch with its own statistics).
Groups are counted from the start of every epoch. When an epoch's batch count is not a multiple of K
its last group is shorter, and its gradients are rescaled by K / m (m micro-batches): the step is
still the mean over the group's samples, as timm's shortened last step.

Under DDP every micro-batch but a group's last runs in ``no_sync`` (the gradients add up locally and
the last backward all-reduces them once), so the trainer must know a micro-batch closes its group
before its backward. :func:`micro_batches` looks one batch ahead for that, inside a group only: at a
group boundary, where checkpoints are taken, no batch has been taken from the loader and not trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.metrics import ScaleMeter

_END = object()


def optimizer_steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimiser steps of an epoch of ``batches`` loader batches: what the learning-rate schedule counts."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    return math.ceil(batches / accum_steps)


@dataclass(frozen=True)
class MicroBatch:
    """One loader batch and its place in its optimiser step's group."""

    batch: MultiScaleBatch
    index: int = 0  # position in the group, from 0
    closes_group: bool = True  # the group's last micro-batch: the optimiser step follows it

    @property
    def group_size(self) -> int:
        """Micro-batches of the group so far; the group's size once ``closes_group``."""
        return self.index + 1


def micro_batches(batches: Iterable[MultiScaleBatch], *, accum_steps: int, start: int = 0) -> Iterator[MicroBatch]:
    """``batches`` as micro-batches of groups of ``accum_steps``; ``start``: batches of the epoch already
    trained (a resumed epoch, which continues at a group boundary)."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if start % accum_steps:
        raise ValueError(f"an epoch resumes at a group boundary, not at batch {start} of groups of {accum_steps}")
    source = iter(batches)
    pending = next(source, _END)
    position = start
    while pending is not _END:
        index = position % accum_steps
        if index == accum_steps - 1:
            yield MicroBatch(pending, index, closes_group=True)
            # Fetched only when the trainer asks for the next micro-batch, after the step's checkpoint.
            following = next(source, _END)
        else:
            following = next(source, _END)
            yield MicroBatch(pending, index, closes_group=following is _END)
        pending, position = following, position + 1


@dataclass
class PendingStep:
    """What an optimiser step collects over its micro-batches until it is taken or skipped.

    The metrics go into a meter of their own, merged into the epoch's only when the step is taken; the
    buffers (BatchNorm running statistics) are those from before the first micro-batch, restored when
    the step is skipped.
    """

    saved_buffers: list[torch.Tensor]
    meter: ScaleMeter
    finite: bool = True
    images: int = 0
    loss_sum: torch.Tensor | None = None
    micro_batches: int = 0

    def add(self, *, total: torch.Tensor, finite: bool, images: int) -> None:
        self.finite = self.finite and finite
        self.images += images
        self.loss_sum = total if self.loss_sum is None else self.loss_sum + total
        self.micro_batches += 1

    def mean_loss(self) -> torch.Tensor | None:
        """The mean of the micro-batches' totals (the step's objective), still on the device."""
        if self.loss_sum is None or self.micro_batches == 1:
            return self.loss_sum
        return self.loss_sum / self.micro_batches


@torch.no_grad()
def rescale_gradients(parameters: Iterable[torch.nn.Parameter], factor: float) -> None:
    """Multiply every gradient by ``factor`` (a shortened group: K / m), in place."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)
