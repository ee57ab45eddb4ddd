"""``msdali benchmark``: loader and training throughput of every backend, measured in one process.

This module runs the sections in order (:func:`run_benchmark`) and re-exports the report helpers;
the sections themselves live in the sibling modules (see the package docstring).

Every backend reads the same files at the same scales and batch size on the same device:

* ``dali``: the DALI multi-scale pipeline (``mixed`` GPU decoding on CUDA, CPU operators otherwise);
* ``dali-1scale``: the same pipeline emitting only the largest scale, to price the extra scales;
* ``torchvision``: decode once per sample, resize per scale (``torch_pipeline``);
* ``baseline``: what the seed project did, a PIL ``Dataset`` that opens, decodes and transforms the
  image separately for every scale (``RandomResizedCrop`` + flip + ``ToTensor`` + ``Normalize``
  per scale) behind a torch ``DataLoader``.

Method (the same for every backend):

* The files are read once beforehand so every backend starts from a warm OS page cache.
* A short file list is repeated until one epoch holds a whole trial: ImageNet epochs are
  thousands of batches long, and an epoch boundary every few batches would measure worker and
  pipeline restarts instead of steady state.
* A trial builds a fresh loader and times its first batch (construction included) on its own,
  skips ``warmup`` batches, then times one window of ``iters`` batches. Every case (backend x
  worker count) runs one trial per round, for ``repeats`` rounds, so load from other jobs on a
  shared machine spreads over all cases instead of hitting whichever ran at the time. Medians over
  the rounds are reported with min and max; each window also records the 1-minute load average.
* Every output is consumed (one pixel per image and channel of every scale, and the labels, summed
  on the device) and CUDA is synchronised before each clock read, so no work escapes the clock.
* torchvision and the baseline are swept over DataLoader worker counts and compared at their best.

Training throughput runs the :class:`MultiScaleTrainer` step on each loader's batches and on one
batch of random tensors already on the device (the compute ceiling); the gap is the share of time
lost to data loading. Peak memory of one step (all scales' activations alive until one backward vs.
``TrainerOptions(memory_efficient=True)``, with and without the largest scale micro-batched) is
measured in a fresh subprocess per mode, see
:func:`~multiscale_dali.benchmark.memory.measure_step_memory`.

The result is a plain JSON-able dict; :func:`format_report` renders it as Markdown tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from multiscale_dali.benchmark.config import (
    BENCHMARK_BACKENDS,
    DALI,
    DALI_1SCALE,
    MULTI_SCALE_BACKENDS,
    BenchConfig,
    default_worker_counts,
    repeat_to_fill,
    samples_needed,
)
from multiscale_dali.benchmark.dataset import (
    BenchData,
    check_readable,
    describe_files,
    resolve_data,
    warm_page_cache,
)
from multiscale_dali.benchmark.goals import compute_ratios, evaluate_goals
from multiscale_dali.benchmark.gpu import benchmark_gpu
from multiscale_dali.benchmark.loaders import benchmark_loaders
from multiscale_dali.benchmark.machine import describe_machine, usable_cpus
from multiscale_dali.benchmark.measure import load_1min
from multiscale_dali.benchmark.memory import measure_step_memory
from multiscale_dali.benchmark.report import format_report, save_results
from multiscale_dali.benchmark.step import benchmark_training
from multiscale_dali.pipelines.schedule import constant_schedule

__all__ = ["format_report", "run_benchmark", "save_results"]

RESULTS_SCHEMA = 1


def _resolve_device(device: str) -> str:
    from multiscale_dali.training.distributed import resolve_device

    return str(resolve_device(device))


def _check_args(*, scales: Sequence[int], batch_size: int, backends: Sequence[str], iters: int,
                warmup: int, repeats: int, workers: Sequence[int] | None) -> None:
    unknown = [b for b in backends if b not in BENCHMARK_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BENCHMARK_BACKENDS)}")
    if not backends:
        raise ValueError("at least one backend is needed")
    constant_schedule(scales)  # validates: positive, strictly increasing
    for name, value, low in (("batch_size", batch_size, 1), ("iters", iters, 1), ("repeats", repeats, 1),
                             ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if workers is not None and (not workers or any(w < 0 for w in workers)):
        raise ValueError(f"workers must be non-negative counts, got {list(workers)}")


def _expand_backends(backends: Sequence[str], scales: Sequence[int]) -> tuple[str, ...]:
    """Requested backends in a fixed order; ``dali`` brings ``dali-1scale`` (the cost of extra scales)."""
    wanted = set(backends)
    if DALI in wanted and len(scales) > 1:
        wanted.add(DALI_1SCALE)
    return tuple(b for b in BENCHMARK_BACKENDS if b in wanted)


def _bench_config(chosen: BenchData, *, scales: Sequence[int], batch_size: int, device: str, iters: int,
                  warmup: int, repeats: int, workers: Sequence[int] | None, dali_threads: int | None,
                  seed: int) -> BenchConfig:
    """The run's configuration: the chosen files repeated to fill a trial, the worker counts to sweep
    (default :func:`~multiscale_dali.benchmark.config.default_worker_counts`) and the DALI threads
    (default: the usable cores)."""
    files, labels = repeat_to_fill(chosen.files, chosen.labels, min_samples=samples_needed(
        batch_size=batch_size, warmup=warmup, iters=iters))
    cpus = usable_cpus()
    return BenchConfig(
        files=files, labels=labels, num_classes=chosen.num_classes, scales=tuple(scales),
        batch_size=batch_size, device=device, iters=iters, warmup=warmup, repeats=repeats,
        worker_counts=tuple(workers or default_worker_counts(cpu_count=cpus, cuda=device.startswith("cuda"))),
        dali_threads=dali_threads or cpus, seed=seed,
    )


def run_benchmark(
    *,
    data: Path | None,
    scales: tuple[int, ...],
    batch_size: int,
    backends: tuple[str, ...],
    model: str | None,
    iters: int,
    device: str,
    workers: tuple[int, ...] | None,
    warmup: int,
    repeats: int,
    synthetic: int | None,
    dali_threads: int | None = None,
    memory: bool = True,
    cache_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every section and return the results dict (see the module docstring for the method).

    ``data=None`` and ``synthetic=None``: the embedded texture photos' train split. ``workers``:
    DataLoader worker counts to sweep (default :func:`default_worker_counts`). ``model=None`` skips
    the training and memory sections. ``dali_threads`` defaults to the usable cores.
    """
    _check_args(scales=scales, batch_size=batch_size, backends=backends, iters=iters, warmup=warmup,
                repeats=repeats, workers=workers)
    device = _resolve_device(device)
    chosen = resolve_data(data=data, synthetic=synthetic, cache_dir=cache_dir)
    if data is not None:  # the generated and embedded photos are known to decode
        check_readable(chosen)
    cfg = _bench_config(chosen, scales=scales, batch_size=batch_size, device=device, iters=iters, warmup=warmup,
                        repeats=repeats, workers=workers, dali_threads=dali_threads, seed=seed)
    warm_page_cache(chosen.files)
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "config": {**cfg.to_json(), "model": model, "backends": list(backends)},
        "data": {"root": str(chosen.root), "source": chosen.source, "unique_files": len(chosen.files),
                 "num_classes": chosen.num_classes, **describe_files(chosen.files)},
        "machine": describe_machine(device),
        "loader": benchmark_loaders(cfg, _expand_backends(backends, scales)),
    }
    if model is not None:
        best = {b: results["loader"][b]["best"]["workers"] for b in MULTI_SCALE_BACKENDS
                if "best" in results["loader"].get(b, {})}
        results["training"] = benchmark_training(cfg, model=model, workers=best)
        if memory:
            results["memory"] = measure_step_memory(model=model, num_classes=cfg.num_classes, scales=cfg.scales,
                                                    batch_size=batch_size, device=device, seed=seed)
    results["gpu"] = benchmark_gpu(cfg)
    results["machine"]["load_1min_at_end"] = load_1min()
    results["ratios"] = compute_ratios(results)
    results["goals"] = evaluate_goals(results)
    return results
