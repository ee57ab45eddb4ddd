"""Activation checkpointing of one forward, segment by segment: how the memory-efficient step keeps a
BatchNorm model's gradients exact while its largest scale stops being the step's peak.

Micro-batching the largest scale (``micro_batch.py``) changes what BatchNorm normalises with; checkpointing
does not: the forward runs on the whole batch, only the activations inside each segment are dropped
and recomputed from the segment's input during the backward. Checkpointing the forward as one piece
would rebuild all of it at once in the backward (the peak stays); segments keep one segment's
activations alive at a time.

Segments come from the network's own structure, with no per-architecture code: every outermost
``nn.Sequential`` (tiny_cnn's ``features``, a ResNet's ``layer1``..``layer4``, timm stages) runs its
children in groups of about ``sqrt(n)``, each group under ``torch.utils.checkpoint`` (non-reentrant).
A group never starts with an in-place module (``ReLU(inplace=True)``): it would overwrite the tensor
the group is recomputed from; a Sequential that itself starts with one runs its first group as usual.
Layers outside any Sequential (a ResNet stem) run as usual, and so do Sequential subclasses with a
``forward`` of their own.

The recomputation runs BatchNorm's train-mode forward a second time, which would move its running
statistics twice; :func:`restore_buffers` puts back the values the real forward left.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _segmentable(module: nn.Module) -> bool:
    # A subclass with its own forward (timm's SequentialList, ...) does more than chain its children.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module) >= 2


def _outermost_sequentials(net: nn.Module) -> list[nn.Sequential]:
    found: list[nn.Sequential] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if _segmentable(child):
                found.append(child)
            else:
                visit(child)

    if _segmentable(net):
        return [net]
    visit(net)
    return found


def _in_place(module: nn.Module) -> bool:
    return bool(getattr(module, "inplace", False))


def segment_groups(children: list[nn.Module]) -> list[list[nn.Module]]:
    """``children`` cut into groups of about ``sqrt(n)``, none starting with an in-place module."""
    size = max(1, math.ceil(math.sqrt(len(children))))
    groups: list[list[nn.Module]] = []
    for child in children:
        starts_group = not groups or (len(groups[-1]) >= size and not _in_place(child))
        if starts_group:
            groups.append([child])
        else:
            groups[-1].append(child)
    return groups


def _run_group(group: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in group:
        x = module(x)
    return x


def _segmented_forward(groups: list[list[nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for group in groups:
        if _in_place(group[0]):
            # Only a Sequential's first group can start in place (EfficientNet's classifier opens with
            # Dropout(inplace=True)): it would overwrite the input its recomputation starts from.
            x = _run_group(group, x)
        else:
            x = checkpoint(_run_group, group, x, use_reentrant=False)
    return x


@contextlib.contextmanager
def checkpointed_segments(net: nn.Module) -> Iterator[int]:
    """Within the context, ``net``'s outermost Sequentials run in checkpointed segments; yields how
    many were found (0: nothing is checkpointed). Their ``forward`` is an instance attribute for
    the duration only, so the module, its state dict and other callers are untouched."""
    patched = []
    for sequential in _outermost_sequentials(net):
        groups = segment_groups(list(sequential.children()))
        sequential.forward = lambda x, groups=groups: _segmented_forward(groups, x)
        patched.append(sequential)
    try:
        yield len(patched)
    finally:
        for sequential in patched:
            del sequential.forward


def has_segments(net: nn.Module) -> bool:
    """Whether :func:`checkpointed_segments` would checkpoint anything in ``net``."""
    return bool(_outermost_sequentials(net))


def snapshot_buffers(buffers: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``buffers`` (a network's BatchNorm statistics and counters), for :func:`restore_buffers`.
    Also what the trainer keeps to undo a step skipped for a non-finite loss."""
    return [buffer.detach().clone() for buffer in buffers]


@torch.no_grad()
def restore_buffers(buffers: Iterable[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for buffer, value in zip(buffers, saved):
        buffer.copy_(value)
