"""The module a training step calls, built around the bare network: SyncBatchNorm, ``torch.compile``,
all scales in one forward, and DDP.

The bare network stays the trainer's ``net``: checkpoints save it and evaluation runs it, so neither
sees a wrapper's key prefixes (``module.``, ``_orig_mod.``) or a compiled graph.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multiscale_dali.errors import ConfigError
from multiscale_dali.training.compiled import compile_network, compile_unavailable
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.distributed import DistributedContext


class MultiScaleModel(nn.Module):
    """Runs one network on every scale inside a single ``forward``.

    DDP expects one forward per backward; several forwards of the bare network before one backward
    can raise "marked ready twice". Wrapping the scales here keeps the step DDP-friendly.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {scale: self.net(x) for scale, x in images.items()}


def sync_batchnorm(net: nn.Module) -> nn.Module:
    """``net`` with every BatchNorm layer turned into a SyncBatchNorm over the default process group.

    The layers keep their parameters (the same ``Parameter`` objects, so an optimizer built before
    still trains them), buffers and state-dict keys.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def training_modules(
    net: nn.Module, *, distributed: DistributedContext, device: torch.device, compile_backend: str | None = None,
    sync_bn: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """``(bare network, module the step calls)`` for ``net``.

    ``sync_bn`` converts BatchNorm to SyncBatchNorm first (a distributed run only: it synchronises
    over the ranks); ``compile_backend`` compiles the network (not the DDP wrapper: DDP's gradient
    hooks then run outside the graph, as in an eager step); DDP wraps all scales in one forward.
    """
    if sync_bn:
        if not distributed.is_distributed:
            raise ValueError("SyncBatchNorm synchronises over the ranks of a distributed run; this one has one process")
        net = sync_batchnorm(net)
    inner = net if compile_backend is None else compile_network(net, backend=compile_backend)
    model: nn.Module = MultiScaleModel(inner)
    if distributed.is_distributed:
        # One DDP wrapper around all scales: one forward and one backward per step, which is what
        # DDP's gradient hooks expect. Construction broadcasts rank 0's weights to every rank.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return net, model


def check_wrapping(config: TrainConfig, context: DistributedContext) -> None:
    """Refuse ``--sync-bn`` and ``--compile`` where they cannot run, before any data is read."""
    if config.sync_bn and not (context.is_distributed and context.device.type == "cuda"):
        where = "a single process" if not context.is_distributed else "the CPU (gloo has no SyncBatchNorm)"
        raise ConfigError("sync_bn", f"needs CUDA devices under torchrun (several processes with NCCL); this run "
                          f"is {where}. Launch with torchrun --nproc-per-node N on GPUs, or drop --sync-bn")
    if config.memory_efficient and config.private_scale_norm and context.is_distributed:
        # One backward per scale, and DDP all-reduces in the last one only: the other scales'
        # BatchNorm branches take no part in it, so their gradients would never be averaged.
        raise ConfigError("memory_efficient", "under torchrun needs --scale-norm shared: with BatchNorm private to "
                          "each scale, only the last scale's branch takes part in the backward that DDP all-reduces")
    if config.compile:
        reason = compile_unavailable(context.device)
        if reason is not None:
            raise ConfigError("compile", f"{reason}; train without --compile")
