"""Per-scale running metrics, accumulated on the device so a step never waits for the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from multiscale_dali.training.distributed import DistributedContext


@dataclass
class ScaleMeter:
    """Sums of loss and correct predictions per scale, plus the loss components of the step.

    Tensors stay where the step produced them; ``float()`` happens once, in :meth:`compute`.
    """

    loss_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    correct: dict[int, torch.Tensor] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    count: int = 0
    skipped: int = 0

    def update(self, scale: int, loss_mean: torch.Tensor | float, correct: torch.Tensor, batch_size: int) -> None:
        loss = torch.as_tensor(loss_mean).detach().double() * batch_size
        hits = correct.detach().sum().double()
        if scale in self.loss_sum:
            self.loss_sum[scale] = self.loss_sum[scale] + loss
            self.correct[scale] = self.correct[scale] + hits
        else:
            self.loss_sum[scale], self.correct[scale] = loss, hits

    def add_components(self, components: dict[str, float], batch_size: int) -> None:
        for key, value in components.items():
            self.components[key] = self.components.get(key, 0.0) + value * batch_size

    def add_samples(self, batch_size: int) -> None:
        self.count += batch_size

    def add_meter(self, other: "ScaleMeter") -> None:
        """Add ``other``'s sums and counts (a step's metrics, kept apart until the step was taken)."""
        for scale, loss in other.loss_sum.items():
            if scale in self.loss_sum:
                self.loss_sum[scale] = self.loss_sum[scale] + loss
                self.correct[scale] = self.correct[scale] + other.correct[scale]
            else:
                self.loss_sum[scale], self.correct[scale] = loss, other.correct[scale]
        for key, value in other.components.items():
            self.components[key] = self.components.get(key, 0.0) + value
        self.count += other.count
        self.skipped += other.skipped

    def add_skipped_step(self) -> None:
        self.skipped += 1

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

    def reduced(self, context: "DistributedContext") -> "ScaleMeter":
        """The meter summed over every rank (a collective: all ranks call it); ``self`` in one process.

        Sums and counts add up, so with padded duplicates left out by the trainer each sample counts
        exactly once. ``skipped`` is not summed: the ranks agree on every skip, so each holds the
        run's count already. ``self`` is left as it is.
        """
        if not context.is_distributed:
            return self
        # A rank may lack a key the others have (nothing accumulated yet after a resume): agree on the
        # union first, or the packed vectors would not line up.
        known = context.all_gather_object((sorted(self.loss_sum), sorted(self.components)))
        scales = sorted({s for rank_scales, _ in known for s in rank_scales})
        names = sorted({n for _, rank_names in known for n in rank_names})
        zero = torch.zeros((), dtype=torch.float64)
        values = (
            [self.loss_sum.get(s, zero) for s in scales]
            + [self.correct.get(s, zero) for s in scales]
            + [torch.tensor(self.components.get(n, 0.0), dtype=torch.float64) for n in names]
            + [torch.tensor(float(self.count), dtype=torch.float64)]
        )
        packed = torch.stack([v.to(device=context.device, dtype=torch.float64) for v in values])
        totals = context.all_reduce_sum(packed).cpu().tolist()
        width = len(scales)
        return ScaleMeter(
            loss_sum={s: torch.tensor(v, dtype=torch.float64) for s, v in zip(scales, totals[:width])},
            correct={s: torch.tensor(v, dtype=torch.float64) for s, v in zip(scales, totals[width : 2 * width])},
            components=dict(zip(names, totals[2 * width : 2 * width + len(names)])),
            count=int(round(totals[-1])),
            skipped=self.skipped,
        )

    def mean_components(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.components.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only, so a mid-epoch checkpoint keeps the partial epoch's metrics."""
        return {
            "loss_sum": {str(s): float(v) for s, v in self.loss_sum.items()},
            "correct": {str(s): float(v) for s, v in self.correct.items()},
            "components": dict(self.components),
            "count": self.count,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ScaleMeter":
        return cls(
            loss_sum={int(s): torch.tensor(v, dtype=torch.float64) for s, v in state["loss_sum"].items()},
            correct={int(s): torch.tensor(v, dtype=torch.float64) for s, v in state["correct"].items()},
            components=dict(state["components"]),
            count=int(state["count"]),
            skipped=int(state["skipped"]),
        )
