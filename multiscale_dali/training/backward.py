"""Forward and backward of one (micro-)batch: every scale in one graph, or one scale at a time.

The naive path keeps every scale's activations alive until one backward. The memory-efficient path
runs the largest scale first and each smaller scale against its detached prediction, one graph at a
time, and can cut the largest scale into chunks (:mod:`~multiscale_dali.training.micro_batch`) or run
its forward in checkpointed segments (:mod:`~multiscale_dali.training.segments`). Both
backpropagate ``loss_scale`` times the objective (1/K under gradient accumulation), and under DDP
every backward but the one that closes the optimiser step runs in ``no_sync``: the gradients add up
locally and that last backward all-reduces their sum once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multiscale_dali.training.compiled import no_shape_budget
from multiscale_dali.training.losses import ScaleConsistencyLoss, ScaleShare, StepLosses
from multiscale_dali.training.micro_batch import largest_scale_chunks, split_batch
from multiscale_dali.training.recipe import PreparedBatch
from multiscale_dali.training.segments import checkpointed_segments, restore_buffers, snapshot_buffers


def _scaled(loss: torch.Tensor, factor: float) -> torch.Tensor:
    # Untouched at 1: a step without accumulation backpropagates exactly what it always did.
    return loss if factor == 1.0 else loss * factor


@dataclass(frozen=True)
class StepBackward:
    """Runs ``model`` (the step's module: :class:`MultiScaleModel`, DDP-wrapped under torchrun) on a
    prepared batch (images and the targets the loss fits, hard or per-scale soft) and backpropagates the
    loss through ``scaler``; returns the step's losses and detached logits."""

    model: nn.Module
    loss: ScaleConsistencyLoss
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None = None  # None: full precision
    memory_efficient: bool = False
    micro_batch_largest: bool = False  # with memory_efficient: the largest scale in chunks
    # With memory_efficient (and not micro-batched): the bare network whose largest-scale forward runs
    # in checkpointed segments (segments.py), exact with BatchNorm; None: not checkpointed.
    checkpoint_net: nn.Module | None = None
    # Around every call of a compiled network: its recompile limit (see compiled.shape_budget).
    shape_budget: Callable[[], ContextManager[object]] = no_shape_budget

    def autocast(self) -> ContextManager[object]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def no_sync(self, active: bool) -> ContextManager[object]:
        """DDP's ``no_sync`` (gradients accumulate locally, no all-reduce) when ``active``."""
        if active and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def __call__(self, prepared: PreparedBatch, *, loss_scale: float = 1.0,
                 sync: bool = True) -> tuple[StepLosses, dict[int, torch.Tensor]]:
        """``sync``: this backward closes the optimiser step (DDP all-reduces in it)."""
        if self.memory_efficient and len(prepared.batch.images) > 1:
            return self._one_scale_at_a_time(prepared, loss_scale=loss_scale, sync=sync)
        with self.no_sync(not sync):
            with self.autocast(), self.shape_budget():
                logits = self.model(prepared.batch.images)
                losses = self.loss.step_losses(logits, prepared.targets)
            self.scaler.scale(_scaled(losses.total, loss_scale)).backward()
        return losses, {scale: out.detach() for scale, out in logits.items()}

    def _one_scale_at_a_time(self, prepared: PreparedBatch, *, loss_scale: float,
                             sync: bool) -> tuple[StepLosses, dict[int, torch.Tensor]]:
        """Largest scale first, then each smaller scale against the detached largest-scale target.

        Only one scale's activations are alive at a time; the gradients equal the naive step's when
        the teacher is the detached largest scale (the consistency term does not flow into it). Each
        forward is followed by its own backward, so DDP never sees two forwards in a row.
        """
        batch = prepared.batch
        scales = sorted(batch.images, reverse=True)
        logits: dict[int, torch.Tensor] = {}
        shares: dict[int, ScaleShare] = {}
        teacher: torch.Tensor | None = None
        weights = self.loss.base_weights(scales)
        total = torch.zeros((), device=self.device)
        chunks = largest_scale_chunks(batch.images) if self.micro_batch_largest else 1
        for index, scale in enumerate(scales):
            if teacher is None and chunks > 1:
                share, out = self._largest_in_chunks(prepared, scale, chunks, num_scales=len(scales),
                                                     base_weight=weights[scale], loss_scale=loss_scale)
            else:
                # The largest scale on its whole batch may run its forward in checkpointed segments.
                segmented = self.checkpoint_net if teacher is None else None
                with self.no_sync(not (sync and index == len(scales) - 1)):
                    with self.autocast(), self.shape_budget():
                        with checkpointed_segments(segmented) if segmented is not None else contextlib.nullcontext():
                            out = self.model({scale: batch.images[scale]})[scale]
                        share = self.loss.scale_share(out, prepared.target_at(scale), teacher, num_scales=len(scales),
                                                      is_teacher=teacher is None, base_weight=weights[scale])
                    # The backward recomputes the segments, BatchNorm's train-mode forward included, which
                    # moves its running statistics a second time: put back what the real forward left.
                    # Nothing runs in between, so a private BatchNorm still has this scale's branch selected.
                    after_forward = snapshot_buffers(segmented.buffers()) if segmented is not None else []
                    self.scaler.scale(_scaled(share.total, loss_scale)).backward()
                    if segmented is not None:
                        restore_buffers(segmented.buffers(), after_forward)
                out = out.detach()
            total = total + share.total.detach().float()
            shares[scale] = share
            logits[scale] = out
            if teacher is None:
                teacher = out
        return StepLosses.from_shares(shares, total, weights), logits

    def _largest_in_chunks(self, prepared: PreparedBatch, scale: int, chunks: int, *, num_scales: int,
                           base_weight: float, loss_scale: float) -> tuple[ScaleShare, torch.Tensor]:
        """The largest (teacher) scale in ``chunks`` pieces, each forward followed by its backward.

        Its share of the objective is ``w_s * base`` with ``base`` a batch mean, so a chunk of ``n_c``
        of the batch's ``B`` samples contributes ``n_c / B`` of it. Never the step's last backward
        (smaller scales follow), so every chunk runs in ``no_sync``.
        """
        images, size = prepared.batch.images[scale], prepared.batch.images[scale].shape[0]
        outs, bases = [], []
        with self.no_sync(True):
            for x, labels in zip(split_batch(images, chunks), split_batch(prepared.target_at(scale), chunks)):
                weight = x.shape[0] / size
                with self.autocast(), self.shape_budget():
                    out = self.model({scale: x})[scale]
                    share = self.loss.scale_share(out, labels, None, num_scales=num_scales, is_teacher=True,
                                                  base_weight=base_weight)
                self.scaler.scale(share.total * (weight * loss_scale)).backward()
                outs.append(out.detach())
                bases.append(share.base.detach() * weight)
        base = torch.stack(bases).sum()
        return ScaleShare(base=base, divergence=None, total=base * base_weight), torch.cat(outs)
