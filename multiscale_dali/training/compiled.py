"""``--compile``: the network under ``torch.compile`` for the training step, one static graph per input shape.

``dynamic=False`` keeps one graph per scale: without it, dynamo's automatic dynamic shapes would
recompile on the second scale into one shape-generic graph, giving up the per-shape kernels that make
compiling a convolutional network pay. The shapes a fixed schedule sees are few and all appear in its
first epoch (each scale's batch, the epoch's last shorter batch, the memory-efficient step's chunks),
so no graph is compiled after it. Dynamo stops compiling a function after ``recompile_limit`` graphs
(8 by default) and then runs it eagerly without a word, so the trainer raises that limit for its own
calls only (:func:`shape_budget`), never for the process.

Only the training step is compiled: the bare network stays what checkpoints save (no ``_orig_mod.``
prefix in its keys) and what evaluation runs, eagerly, so switching to eval mode never adds graphs.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

INDUCTOR = "inductor"
# Graphs one scale may need: the full batch and the epoch's last, shorter one, each whole and in the
# (up to two sizes of) chunks of the memory-efficient step, with a margin.
SHAPES_PER_SCALE = 8


def compile_network(net: nn.Module, *, backend: str = INDUCTOR) -> nn.Module:
    """``net`` compiled with one static graph per input shape; it shares ``net``'s parameters."""
    return torch.compile(net, backend=backend, dynamic=False)


def shape_budget(num_scales: int) -> ContextManager[object]:
    """Dynamo's recompile limit raised to cover ``num_scales`` scales' shapes, for the ``with`` block."""
    import torch._dynamo

    limit = max(torch._dynamo.config.recompile_limit, SHAPES_PER_SCALE * num_scales)
    return torch._dynamo.config.patch(recompile_limit=limit)


def no_shape_budget() -> ContextManager[object]:
    """What an eager (not compiled) step uses instead of :func:`shape_budget`."""
    return contextlib.nullcontext()


def dynamo_unavailable() -> str | None:
    """Why ``torch.compile`` cannot capture graphs here (None: it can)."""
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:
        return "this PyTorch build has no torch.compile"
    if not is_dynamo_supported():
        return "torch.compile does not support this Python version"
    return None


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``--compile`` cannot run on ``device`` (None: it can): no dynamo, or no C++ compiler for
    inductor's CPU kernels."""
    reason = dynamo_unavailable()
    if reason is None and device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:  # the search raises its own error classes, which vary between versions
            return "compiling for the CPU needs a C++ compiler (g++ or clang++; set CXX), and none was found"
    return reason
