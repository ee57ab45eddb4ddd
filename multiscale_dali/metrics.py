"""Per-scale running metrics, accumulated on the device so a step never waits for the host."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ScaleMeter:
    """Sums of loss and correct predictions per scale; ``.item()`` happens once, in :meth:`compute`."""

    loss_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    correct: dict[int, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def update(self, scale: int, loss_mean: torch.Tensor, correct: torch.Tensor, batch_size: int) -> None:
        loss = loss_mean.detach().float() * batch_size
        hits = correct.detach().sum()
        if scale in self.loss_sum:
            self.loss_sum[scale] += loss
            self.correct[scale] += hits
        else:
            self.loss_sum[scale] = loss.clone()
            self.correct[scale] = hits.clone()

    def add_samples(self, batch_size: int) -> None:
        self.count += batch_size

    def compute(self) -> dict[int, dict[str, float]]:
        if not self.count:
            return {}
        return {
            scale: {
                "loss": float(self.loss_sum[scale]) / self.count,
                "accuracy": float(self.correct[scale]) / self.count,
            }
            for scale in sorted(self.loss_sum)
        }
