"""Loader throughput: every backend at every worker count of its sweep, each trial a fresh loader
whose first batch, warm-up and timed window are measured apart."""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch

from multiscale_dali.benchmark.baseline import BaselineLoader
from multiscale_dali.benchmark.config import (
    BASELINE,
    BENCHMARK_BACKENDS,
    DALI,
    DALI_1SCALE,
    TORCHVISION,
    BenchConfig,
)
from multiscale_dali.benchmark.measure import (
    Case,
    Trial,
    Window,
    best_run,
    load_1min,
    run_interleaved,
    summarize_trials,
    sync_device,
)
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.spec import Loader, LoaderSpec


def make_loader(backend: str, spec: LoaderSpec) -> Loader:
    """A loader of one benchmark backend (``dali-1scale`` is ``dali`` with a one-scale spec)."""
    if backend == BASELINE:
        return BaselineLoader(spec)
    from multiscale_dali.pipelines.factory import build_loader

    if backend in (DALI, DALI_1SCALE):
        return build_loader(spec, backend="dali")
    if backend == TORCHVISION:
        return build_loader(spec, backend="torchvision")
    raise ValueError(f"unknown benchmark backend {backend!r}; choose from {', '.join(BENCHMARK_BACKENDS)}")


def _consume(batch: MultiScaleBatch, acc: torch.Tensor) -> int:
    """Touch every output: one pixel per image and channel of every scale, plus the labels.

    Summed on the device, so nothing waits for the host until the window ends. Returns the batch size.
    """
    for images in batch.images.values():
        acc += images[:, :, -1, -1].float().sum()
    acc += batch.labels.float().sum()
    return batch.batch_size


def batch_stream(loader: Loader, *, first_epoch: int = 0) -> Iterator[MultiScaleBatch]:
    """Every batch of epoch ``first_epoch``, then the next epoch's, and so on for ever."""
    for epoch in itertools.count(first_epoch):
        yield from loader.epoch(epoch)


def _timed_window(stream: Iterator[MultiScaleBatch], *, batches: int, device: str, acc: torch.Tensor) -> Window:
    sync_device(device)
    start = time.perf_counter()
    images = sum(_consume(next(stream), acc) for _ in range(batches))
    sync_device(device)
    return Window(images=images, batches=batches, seconds=time.perf_counter() - start, load_1min=load_1min())


def loader_trial(factory: Callable[[], Loader], *, device: str, warmup: int, iters: int) -> Trial:
    """A fresh loader: time to its first batch (construction included), ``warmup`` untimed batches,
    then one timed window of ``iters`` batches."""
    acc = torch.zeros((), device=device)
    start = time.perf_counter()
    loader = factory()
    stream = batch_stream(loader)
    try:
        _consume(next(stream), acc)
        sync_device(device)
        first_batch_s = time.perf_counter() - start
        for _ in range(warmup):
            _consume(next(stream), acc)
        window = _timed_window(stream, batches=iters, device=device, acc=acc)
    finally:
        stream.close()
        loader.close()
    acc.item()  # the host reads the sum: every consumed value really existed
    return Trial(first_batch_s=first_batch_s, window=window)


def _backend_plan(cfg: BenchConfig, backend: str) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """``(scales, worker counts to sweep, what the worker count means)`` of one backend."""
    if backend == DALI:
        return cfg.scales, (cfg.dali_threads,), "DALI threads"
    if backend == DALI_1SCALE:
        return (max(cfg.scales),), (cfg.dali_threads,), "DALI threads"
    return cfg.scales, cfg.worker_counts, "DataLoader workers"


def loader_case(cfg: BenchConfig, backend: str, spec: LoaderSpec) -> Case:
    """One trial of a fresh ``backend`` loader built from ``spec``, on the run's device and trial shape."""
    return lambda: loader_trial(lambda: make_loader(backend, spec), device=cfg.device,
                                warmup=cfg.warmup, iters=cfg.iters)


def benchmark_loaders(cfg: BenchConfig, backends: Sequence[str]) -> dict[str, Any]:
    """Every backend at every worker count of its sweep, interleaved; ``best`` is each one's fastest."""
    from multiscale_dali.pipelines.factory import dali_installed

    results: dict[str, Any] = {}
    cases: dict[Hashable, Case] = {}
    for backend in backends:
        if backend in (DALI, DALI_1SCALE) and not dali_installed():
            results[backend] = {"backend": backend, "skipped": "DALI is not installed"}
            continue
        scales, worker_counts, meaning = _backend_plan(cfg, backend)
        results[backend] = {"backend": backend, "scales": list(scales), "workers_mean": meaning}
        for workers in worker_counts:
            cases[(backend, workers)] = loader_case(cfg, backend, cfg.spec(scales=scales, workers=workers))
    trials = run_interleaved(cases, rounds=cfg.repeats)
    for (backend, workers), backend_trials in trials.items():
        results[backend].setdefault("runs", []).append({"workers": workers, **summarize_trials(backend_trials)})
    for entry in results.values():
        if "runs" in entry:
            entry["best"] = best_run(entry["runs"])
    return results
