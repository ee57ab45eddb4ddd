"""Model selection: which validated epoch is the best so far, and a copy of its weights."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn


class BestEpoch:
    """The best validated epoch: its score, its number and its weights.

    The score and the epoch go into the training checkpoint; the weights do not (``best.pt`` holds
    them), so a resumed run hands them back with :meth:`adopt`.
    """

    def __init__(self) -> None:
        self.score: tuple[float, float] | None = None
        self.epoch: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, metrics: Mapping[str, float], net: nn.Module) -> bool:
        """Keep ``net``'s weights when ``metrics`` beat the best so far; whether they did.

        A non-finite loss or accuracy never wins: a diverged model (NaN weights) still predicts some
        class, so its accuracy alone could beat a trained model's.
        """
        if not (math.isfinite(metrics["accuracy"]) and math.isfinite(metrics["loss"])):
            return False
        # Higher accuracy wins; lower loss breaks ties (small validation sets tie often).
        score = (metrics["accuracy"], -metrics["loss"])
        if self.score is None or score > self.score:
            self.score, self.epoch = score, epoch
            self.weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
            return True
        return False

    def adopt(self, weights: Mapping[str, torch.Tensor], *, epoch: int | None) -> bool:
        """Take saved best weights, which must be those of the recorded best epoch.

        Weights of another epoch (an older checkpoint resumed after a later ``best.pt`` was written)
        would pair one epoch's score with another's weights: the record is dropped instead, False is
        returned, and the next validated epoch starts the search again.
        """
        if epoch != self.epoch:
            self.score, self.epoch, self.weights = None, None, None
            return False
        self.weights = dict(weights)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": None if self.score is None else list(self.score), "best_epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.score = None if state["best_score"] is None else tuple(state["best_score"])
        self.epoch = state["best_epoch"]
        self.weights = None


def all_finite(net: nn.Module) -> bool:
    """Whether every weight and buffer of ``net`` is finite (a diverged run's are NaN or inf)."""
    return all(bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point())
