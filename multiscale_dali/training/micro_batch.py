"""Micro-batching the largest scale of a memory-efficient step, and when that is exact.

The memory-efficient step keeps one scale's graph alive at a time, so its peak is the largest scale's
activations: at 64/96/128 px that is 128² / (64² + 96² + 128²) = 0.55 of the naive step's. Running
the largest scale's batch in chunks, each forward followed by its backward, brings that down to one
chunk's activations. The gradients are unchanged (each chunk's loss is weighted by its share of the
batch) when the samples of a batch do not interact, which holds for every layer here except
BatchNorm in training mode: it normalises with the statistics of the batch it sees, so a chunk is
normalised with the chunk's statistics and its running statistics take one update per chunk. That
is ghost batch normalisation, a known regulariser but not the naive step, so a model with BatchNorm
is micro-batched only when asked (``--micro-batch-batchnorm``). Otherwise its forward runs on the
whole batch in checkpointed segments (:mod:`~multiscale_dali.training.segments`), which is exact.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from multiscale_dali.training.segments import has_segments

log = logging.getLogger(__name__)


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` holds a BatchNorm layer (also SyncBatchNorm and subclasses such as timm's)."""
    return any(isinstance(module, _BatchNorm) for module in net.modules())


def micro_batch_largest(net: nn.Module, *, memory_efficient: bool, batchnorm_opt_in: bool) -> bool:
    """Whether the memory-efficient step runs the largest scale in chunks: exact without BatchNorm,
    with BatchNorm only when ``batchnorm_opt_in`` (each chunk then uses its own statistics)."""
    if not memory_efficient:
        return False
    if batchnorm_opt_in or not has_batchnorm(net):
        return True
    return False


def checkpoint_largest(net: nn.Module, *, memory_efficient: bool, micro_batched: bool, compiled: bool) -> bool:
    """Whether the memory-efficient step runs the largest scale's forward in checkpointed segments:
    when it is not micro-batched and the network has segments. Not under ``--compile``: swapping a
    module's forward would recompile the graph every step."""
    if not memory_efficient or micro_batched:
        return False
    why_whole = "chunks would change the BatchNorm statistics (--micro-batch-batchnorm allows it)"
    if compiled:
        log.info("memory-efficient step: the largest scale runs as one batch: %s, and checkpointed segments are "
                 "off under --compile", why_whole)
        return False
    if not has_segments(net):
        log.info("memory-efficient step: the largest scale runs as one batch: %s, and %s has no nn.Sequential "
                 "to checkpoint", why_whole, type(net).__name__)
        return False
    log.info("memory-efficient step: the largest scale runs as one batch in checkpointed segments (exact): %s",
             why_whole)
    return True


def pixels(images: torch.Tensor) -> int:
    """Pixels per sample of an NCHW batch."""
    return int(images.shape[-2] * images.shape[-1])


def largest_scale_chunks(images: Mapping[int, torch.Tensor]) -> int:
    """Chunks of the largest scale's batch such that none holds more pixels than the next scale's whole
    batch (``ceil(largest / second)`` in pixels per sample, at most the batch size): the largest scale
    then stops being the step's peak. 1 for a single scale."""
    if len(images) < 2:
        return 1
    ordered = sorted(images)
    largest, second = images[ordered[-1]], images[ordered[-2]]
    return max(1, min(int(largest.shape[0]), math.ceil(pixels(largest) / pixels(second))))


def split_batch(tensor: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    """``tensor`` cut into ``chunks`` consecutive pieces along the batch dimension (views, sizes
    differing by at most one sample)."""
    return torch.tensor_split(tensor, chunks, dim=0)
