"""Peak memory of one training step, naive vs. memory-efficient (whole scales, and the largest scale
micro-batched), each measured in a fresh subprocess."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from multiscale_dali.benchmark.config import BYTES_PER_KIB
from multiscale_dali.benchmark.goals import safe_ratio
from multiscale_dali.benchmark.step import make_trainer, synthetic_batch
from multiscale_dali.pipelines.batch import MultiScaleBatch

if TYPE_CHECKING:
    from multiscale_dali.training.trainer import MultiScaleTrainer

log = logging.getLogger(__name__)

# The memory probe's warm-up step uses this many samples: enough for BatchNorm statistics, small
# enough that its own peak stays far below the measured step's.
MEMORY_WARMUP_SAMPLES = 2
MEMORY_PROBE_TIMEOUT_S = 900
# The step modes compared: every scale's activations alive until one backward;
# TrainerOptions(memory_efficient=True), one scale's graph at a time, the largest scale micro-batched
# when that is exact (a model without BatchNorm); and the same with the largest scale micro-batched
# whatever the model (--micro-batch-batchnorm: BatchNorm then sees each chunk's statistics).
NAIVE, MEMORY_EFFICIENT, MICRO_BATCHED = "naive", "memory_efficient", "micro_batched"
MEMORY_MODES: tuple[str, ...] = (NAIVE, MEMORY_EFFICIENT, MICRO_BATCHED)
_PROBE_CODE = (
    "import sys; from multiscale_dali.benchmark.memory import memory_probe_main; "
    "sys.exit(memory_probe_main(sys.argv[1:]))"
)


def _proc_status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _allocator_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of CPU tensor bytes allocated during ``step`` and not yet freed, from torch's allocator
    events (``profile_memory``). Frees of tensors allocated before the step are not reported by
    the profiler, so this counts what the step itself needs on top of what already existed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _probe(request: dict[str, Any]) -> dict[str, Any]:
    """One step of ``request["mode"]`` after a tiny warm-up step; the memory it needed."""
    device = request["device"]
    trainer = make_trainer(model=request["model"], num_classes=request["num_classes"],
                           scales=request["scales"], device=device,
                           memory_efficient=request["mode"] != NAIVE,
                           micro_batch_batchnorm=request["mode"] == MICRO_BATCHED, seed=request["seed"])
    batch = synthetic_batch(batch_size=request["batch_size"], scales=request["scales"],
                            num_classes=request["num_classes"], device=device, seed=request["seed"])
    small = MultiScaleBatch(images={s: t[:MEMORY_WARMUP_SAMPLES] for s, t in batch.images.items()},
                            labels=batch.labels[:MEMORY_WARMUP_SAMPLES])
    # The warm-up allocates gradients, optimizer state, thread pools and kernel caches, which both
    # modes share: the measured step then shows only its own working memory.
    trainer.train_epoch([small], 0)
    if device.startswith("cuda"):
        return _cuda_step_memory(trainer, batch)
    return _cpu_step_memory(trainer, batch)


def _cuda_step_memory(trainer: MultiScaleTrainer, batch: MultiScaleBatch) -> dict[str, Any]:
    """Allocated device memory at the step's peak, over what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.train_epoch([batch], 1)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"method": "torch.cuda.max_memory_allocated", "step_bytes": peak - before, "peak_bytes": peak}


def _cpu_step_memory(trainer: MultiScaleTrainer, batch: MultiScaleBatch) -> dict[str, Any]:
    """The process's peak RSS over its RSS before the step, and the allocator's view of a second step."""
    reset = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS") * BYTES_PER_KIB
    trainer.train_epoch([batch], 1)
    hwm = _proc_status_kib("VmHWM") * BYTES_PER_KIB
    tensor_peak = _allocator_peak_bytes(lambda: trainer.train_epoch([batch], 2))
    return {"method": "peak RSS (VmHWM) delta in a fresh process", "step_bytes": hwm - rss_before,
            "peak_bytes": hwm, "hwm_reset": reset, "allocator_step_bytes": tensor_peak}


def memory_probe_main(argv: Sequence[str]) -> int:
    """Subprocess entry: ``argv = [request.json, result.json]``."""
    request = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(_probe(request)))
    return 0


def probe_env() -> dict[str, str]:
    """The probe subprocess's environment: this one, with the folder that holds this copy of
    ``multiscale_dali`` first on ``PYTHONPATH``, so the child imports the same package."""
    import_root = str(Path(__file__).resolve().parents[2])  # .../<root>/multiscale_dali/benchmark/memory.py
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (import_root, env.get("PYTHONPATH")) if p)
    return env


def _run_probe(request: dict[str, Any]) -> dict[str, Any]:
    """:func:`_probe` of ``request`` in a fresh Python process; its result."""
    env = probe_env()
    with tempfile.TemporaryDirectory(prefix="msdali-memprobe-") as tmp:
        request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-c", _PROBE_CODE, str(request_path), str(result_path)],
                              capture_output=True, text=True, env=env, timeout=MEMORY_PROBE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe ({request['mode']}) failed: {done.stderr.strip()[-2000:]}")
        return json.loads(result_path.read_text())


def measure_step_memory(*, model: str, num_classes: int, scales: Sequence[int], batch_size: int,
                        device: str, seed: int = 0) -> dict[str, Any]:
    """Working memory of one multi-scale step in each of :data:`MEMORY_MODES`, each in a fresh process;
    ``<mode>_vs_naive`` (and ``allocator_<mode>_vs_naive`` on the CPU) for the memory-efficient modes.

    CUDA: ``max_memory_allocated`` minus the allocation before the step (after a reset of the peak).
    CPU: the rise of the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) over
    its RSS before the step; a fresh process per mode because RSS never shrinks back reliably and
    the second mode would reuse the first's freed heap. The CPU result also carries the allocator's
    view (live tensor bytes, ``allocator_step_bytes``) as a cross-check.
    """
    results: dict[str, Any] = {}
    for mode in MEMORY_MODES:
        log.info("memory: one %s step of %s in a fresh process", mode, model)
        results[mode] = _run_probe({"model": model, "num_classes": num_classes, "scales": list(scales),
                                    "batch_size": batch_size, "device": device, "mode": mode, "seed": seed})
    naive = results[NAIVE]
    for mode in MEMORY_MODES[1:]:
        results[f"{mode}_vs_naive"] = safe_ratio(results[mode]["step_bytes"], naive["step_bytes"])
        if "allocator_step_bytes" in naive:
            results[f"allocator_{mode}_vs_naive"] = safe_ratio(
                results[mode]["allocator_step_bytes"], naive["allocator_step_bytes"])
    results["method"] = naive["method"]
    return results
