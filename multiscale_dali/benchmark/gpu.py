"""The GPU-only sections: DALI's decode-only ceiling and sweeps of ``hw_decoder_load`` and threads."""

from __future__ import annotations

import time
from typing import Any, Hashable, Sequence

from multiscale_dali.benchmark.config import DALI, BenchConfig, thread_counts
from multiscale_dali.benchmark.loaders import loader_case
from multiscale_dali.benchmark.machine import usable_cpus
from multiscale_dali.benchmark.measure import (
    Case,
    Trial,
    Window,
    load_1min,
    run_interleaved,
    summarize_trials,
    sync_device,
)
from multiscale_dali.constants import DEFAULT_HW_DECODER_LOAD

# hw_decoder_load values swept on a GPU: all on the CUDA/CPU hybrid path (0) to all on the hardware
# JPEG engines (1), with DALI's usual defaults in between.
HW_DECODER_LOADS: tuple[float, ...] = (0.0, 0.5, 0.65, 0.8, 1.0)


def decode_only_trial(cfg: BenchConfig, *, threads: int, hw_decoder_load: float) -> Trial:
    """DALI read + decode with no crop or resize: the ceiling the multi-scale graph is held to.

    The decoded images keep their own sizes, so the pipeline is run directly rather than through a
    dense iterator; a device-wide synchronisation covers DALI's own CUDA streams.
    """
    from multiscale_dali.pipelines.dali.pipeline import decode_only_pipeline

    start = time.perf_counter()
    pipe = decode_only_pipeline(files=cfg.files, batch_size=cfg.batch_size, num_threads=threads,
                                device=cfg.device, hw_decoder_load=hw_decoder_load)
    try:
        pipe.run()
        sync_device(cfg.device)
        first_batch_s = time.perf_counter() - start
        for _ in range(cfg.warmup):
            pipe.run()
        sync_device(cfg.device)
        begin = time.perf_counter()
        images = sum(len(pipe.run()[0]) for _ in range(cfg.iters))
        sync_device(cfg.device)
        seconds = time.perf_counter() - begin
    finally:
        del pipe
    return Trial(first_batch_s=first_batch_s,
                 window=Window(images=images, batches=cfg.iters, seconds=seconds, load_1min=load_1min()))


# The case key and results entry of the decode-only ceiling among the sweep points.
DECODE_ONLY = "decode_only"


def _sweep_cases(cfg: BenchConfig, *, threads: Sequence[int], hw_decoder_loads: Sequence[float]
                 ) -> dict[Hashable, Case]:
    cases: dict[Hashable, Case] = {
        DECODE_ONLY: lambda: decode_only_trial(cfg, threads=cfg.dali_threads,
                                               hw_decoder_load=DEFAULT_HW_DECODER_LOAD)}
    # Two one-dimensional sweeps crossing at the defaults, not the full grid: each point is a full
    # loader trial per round, and the grid would multiply the run time for little extra insight.
    points = {(cfg.dali_threads, load) for load in hw_decoder_loads}
    points |= {(count, DEFAULT_HW_DECODER_LOAD) for count in threads}
    for count, load in sorted(points):
        cases[(count, load)] = loader_case(cfg, DALI, cfg.spec(workers=count, hw_decoder_load=load))
    return cases


def dali_sweeps(cfg: BenchConfig, *, threads: Sequence[int],
                hw_decoder_loads: Sequence[float]) -> dict[str, Any]:
    """The decode-only ceiling and the multi-scale DALI loader at each thread count and
    ``hw_decoder_load``, interleaved in rounds. Runs on any device (``hw_decoder_load`` only means
    something to the GPU decoder); :func:`benchmark_gpu` calls it on CUDA only."""
    # A sweep point DALI rejects (e.g. no hardware decoder on this GPU) must not lose the others.
    trials = run_interleaved(_sweep_cases(cfg, threads=threads, hw_decoder_loads=hw_decoder_loads),
                             rounds=cfg.repeats, tolerate=(RuntimeError,))
    decode_only = trials.pop(DECODE_ONLY)
    sweep = []
    for (count, load), point in trials.items():
        summary = {"error": point} if isinstance(point, str) else summarize_trials(point)
        sweep.append({"threads": count, "hw_decoder_load": load, **summary})
    return {
        "decode_only": ({"error": decode_only} if isinstance(decode_only, str) else
                        {"threads": cfg.dali_threads, "hw_decoder_load": DEFAULT_HW_DECODER_LOAD,
                         **summarize_trials(decode_only)}),
        "sweep": sweep,
    }


def benchmark_gpu(cfg: BenchConfig) -> dict[str, Any]:
    """Decode-only ceiling and DALI sweeps of ``hw_decoder_load`` and threads (CUDA and DALI only)."""
    if not cfg.device.startswith("cuda"):
        return {"skipped": "no CUDA device: decode-only ceiling and hw_decoder_load/thread sweeps need a GPU"}
    from multiscale_dali.pipelines.factory import dali_installed

    if not dali_installed():
        return {"skipped": "DALI is not installed"}
    return dali_sweeps(cfg, threads=thread_counts(cpu_count=usable_cpus()), hw_decoder_loads=HW_DECODER_LOADS)
