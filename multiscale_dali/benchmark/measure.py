"""Timing: windows of consecutive batches, trials of one case run in interleaved rounds, and their
median/min/max summaries."""

from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """One timed stretch of consecutive batches."""

    images: int
    batches: int
    seconds: float
    # 1-minute load average when the window ended: other jobs on the machine show up here, and a
    # window timed under load is slower for reasons that have nothing to do with the backend.
    load_1min: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {"images": self.images, "batches": self.batches, "seconds": self.seconds,
                "load_1min": self.load_1min}


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max"}`` of ``values`` (at least one)."""
    if not values:
        raise ValueError("summarize needs at least one value")
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def throughput(windows: Sequence[Window]) -> dict[str, dict[str, float]]:
    """Images/s and batches/s over the windows: median with min and max."""
    if any(w.seconds <= 0 for w in windows):
        raise ValueError("every window needs a positive duration")
    return {
        "images_per_s": summarize([w.images / w.seconds for w in windows]),
        "batches_per_s": summarize([w.batches / w.seconds for w in windows]),
    }


def best_run(runs: Sequence[dict]) -> dict:
    """The run with the highest median images/s."""
    return max(runs, key=lambda run: run["images_per_s"]["median"])


@dataclass(frozen=True)
class Trial:
    """One measurement of one case: startup (construction to first batch or step), then one window."""

    first_batch_s: float
    window: Window


Case = Callable[[], Trial]


def run_interleaved(cases: Mapping[Hashable, Case], *, rounds: int,
                    tolerate: tuple[type[BaseException], ...] = ()) -> dict[Hashable, list[Trial] | str]:
    """Run every case once per round, rounds one after the other.

    Interleaving is the point: a background job that comes and goes (a shared CI box, a second
    user) then slows every case alike, instead of whichever case happened to be running. A case
    raising one of ``tolerate`` is recorded as its error message and not run again.
    """
    results: dict[Hashable, list[Trial] | str] = {key: [] for key in cases}
    for round_index in range(rounds):
        for key, case in cases.items():
            if isinstance(results[key], str):
                continue
            try:
                trial = case()
            except tolerate as err:
                log.warning("%s failed: %s", key, err)
                results[key] = f"{type(err).__name__}: {err}"
                continue
            results[key].append(trial)
            log.info("round %d/%d %s: %.0f img/s (first batch %.2fs)", round_index + 1, rounds, key,
                     trial.window.images / trial.window.seconds, trial.first_batch_s)
    return results


def summarize_trials(trials: Sequence[Trial]) -> dict[str, Any]:
    """Median/min/max of startup, images/s and batches/s over the trials, plus the raw windows."""
    return {"time_to_first_batch_s": summarize([t.first_batch_s for t in trials]),
            **throughput([t.window for t in trials]), "windows": [t.window.to_json() for t in trials]}


def load_1min() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def sync_device(device: str) -> None:
    """Wait for the device's queued work (CUDA only), so a clock read after it covers that work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))
