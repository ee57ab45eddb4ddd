"""BatchNorm recalibration: re-estimate the running statistics of a copy of a model at a resolution.

The "train-test resolution discrepancy" fix of FixRes (Touvron et al. 2019): a network's BatchNorm
statistics describe the resolution it was trained at; re-estimating them at the test resolution,
without changing a weight, recovers much of the accuracy lost there. Which images to feed (the train
split, with the eval crop geometry) is the caller's choice; see ``evaluate``.
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)


class BatchNormRecalibration:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated from scratch.

    Feed it batches with :meth:`update`, then take the model from :meth:`finish`. The statistics are
    a cumulative average over the batches fed (``momentum=None``), not an exponential one, so every
    batch counts the same. Only the BatchNorm layers run in train mode: dropout or stochastic depth
    in train mode would perturb the activations that later BatchNorm layers measure. The original
    model is never modified.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        self._norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._momenta = [norm.momentum for norm in self._norms]
        if not self._norms:
            log.warning("%s has no BatchNorm layers: BN recalibration changes nothing", type(model).__name__)
        for norm in self._norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        self.batches = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        self.model(images)
        self.batches += 1

    def finish(self) -> nn.Module:
        for norm, momentum in zip(self._norms, self._momenta):
            norm.momentum = momentum  # back to normal, should anyone fine-tune the copy
        return self.model.eval()


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *, max_batches: int) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated from up to ``max_batches`` batches."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    recalibration = BatchNormRecalibration(model)
    for images in batches:
        if recalibration.batches >= max_batches:
            break
        recalibration.update(images)
    return recalibration.finish()
