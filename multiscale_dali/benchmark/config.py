"""What a benchmark run measures: the backends, the worker and thread counts swept, the files
repeated to fill a trial, and the frozen :class:`BenchConfig` every section reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from multiscale_dali.constants import DEFAULT_HW_DECODER_LOAD
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec

DALI = "dali"
DALI_1SCALE = "dali-1scale"
TORCHVISION = "torchvision"
BASELINE = "baseline"
BENCHMARK_BACKENDS: tuple[str, ...] = (DALI, TORCHVISION, BASELINE, DALI_1SCALE)
# Backends that produce every requested scale, so the same multi-scale training step can run on them.
MULTI_SCALE_BACKENDS: tuple[str, ...] = (DALI, TORCHVISION, BASELINE)

# DataLoader worker counts swept on a CPU-only machine: the main process alone, then one worker per
# core up to two (more workers than cores only adds context switches).
CPU_WORKER_SWEEP_MAX = 2
# Byte units of the machine description, the memory section and the report.
BYTES_PER_MIB = 2**20
BYTES_PER_KIB = 1024


def default_worker_counts(*, cpu_count: int, cuda: bool) -> tuple[int, ...]:
    """DataLoader worker counts to sweep: 0..2 on a CPU box, powers of two up to the cores on a GPU box.

    On a CPU-only machine the workers compete with the training step for the same cores, so more
    than two is not worth a run; a GPU host feeds the device from every core it has.
    """
    cpu_count = max(1, cpu_count)
    if not cuda:
        return tuple(range(min(CPU_WORKER_SWEEP_MAX, cpu_count) + 1))
    powers = [2**k for k in range(cpu_count.bit_length()) if 2**k <= cpu_count]
    return tuple(sorted(set(powers) | {cpu_count}))


def thread_counts(*, cpu_count: int) -> tuple[int, ...]:
    """DALI thread counts swept on a GPU: powers of two up to the cores, and the cores themselves."""
    return default_worker_counts(cpu_count=cpu_count, cuda=True)


def samples_needed(*, batch_size: int, warmup: int, iters: int) -> int:
    """Samples one trial consumes: the first batch, the warm-up and the timed window."""
    return (1 + warmup + iters) * batch_size


def repeat_to_fill(
    files: Sequence[str], labels: Sequence[int], *, min_samples: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``files``/``labels`` repeated whole until there are at least ``min_samples`` (unchanged if enough)."""
    if not files:
        raise ValueError("no files to benchmark")
    copies = max(1, -(-min_samples // len(files)))
    return tuple(files) * copies, tuple(labels) * copies


@dataclass(frozen=True)
class BenchConfig:
    """One run's files, scales, device and trial shape, shared by every section."""

    files: tuple[str, ...]  # already repeated so that one epoch holds a whole trial
    labels: tuple[int, ...]
    num_classes: int
    scales: tuple[int, ...]
    batch_size: int
    device: str
    iters: int
    warmup: int
    repeats: int
    worker_counts: tuple[int, ...]
    dali_threads: int
    seed: int = 0

    def spec(self, *, scales: Sequence[int] | None = None, workers: int,
             hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD) -> LoaderSpec:
        return LoaderSpec(
            files=self.files, labels=self.labels, schedule=constant_schedule(scales or self.scales),
            batch_size=self.batch_size, train=True, device=self.device, seed=self.seed,
            num_workers=workers, drop_last=True, channels_last=True, hw_decoder_load=hw_decoder_load,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scales": list(self.scales), "batch_size": self.batch_size, "device": self.device,
            "iters": self.iters, "warmup": self.warmup, "repeats": self.repeats,
            "worker_counts": list(self.worker_counts), "dali_threads": self.dali_threads,
            "samples_per_epoch": len(self.files), "seed": self.seed,
        }
