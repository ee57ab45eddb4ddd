"""The results as Markdown tables (:func:`format_report`) and as a JSON file (:func:`save_results`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from multiscale_dali.benchmark.config import BASELINE, BYTES_PER_MIB
from multiscale_dali.benchmark.goals import best_ips, safe_ratio
from multiscale_dali.benchmark.memory import MEMORY_MODES
from multiscale_dali.fileio import atomic_write_text, dumps_json


def save_results(results: dict[str, Any], path: Path) -> None:
    """Write the results as indented JSON."""
    atomic_write_text(path, dumps_json(results, indent=2, sort_keys=False) + "\n")


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _spread(stats: dict[str, float], spec: str = ",.0f") -> str:
    return f"{_fmt(stats['median'], spec)} ({_fmt(stats['min'], spec)}-{_fmt(stats['max'], spec)})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine_lines(results: dict) -> list[str]:
    m = results["machine"]
    line = (f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['cpu_count']} CPUs, "
            f"{m.get('memory_gib')} GiB RAM")
    if "gpu" in m:
        line += f"; GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, driver {m['gpu_driver']}, CUDA {m['cuda_runtime']})"
    versions = (f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), torchvision "
                f"{m['torchvision']}, DALI {m['dali']}, Pillow {m['pillow']} "
                f"(libjpeg-turbo {m['pillow_libjpeg_turbo']}), numpy {m['numpy']}")
    load = (f"1-min load average {_fmt(m.get('load_1min_at_start'), '.2f')} at start, "
            f"{_fmt(m.get('load_1min_at_end'), '.2f')} at end (above the usable CPUs means other jobs shared them)")
    return [line, versions, load]


def _config_line(results: dict) -> str:
    c, d = results["config"], results["data"]
    return (f"Data: {d['source']} ({d['unique_files']} files, mean {d['mean_width']}x{d['mean_height']} px, "
            f"{d['mean_file_kib']} KiB) at {d['root']}; scales {c['scales']}, batch {c['batch_size']}, "
            f"device {c['device']}; {c['repeats']} interleaved rounds, each a fresh loader: first batch, "
            f"{c['warmup']} warm-up, {c['iters']} timed batches")


def _loader_rows(results: dict) -> list[list[str]]:
    baseline = best_ips(results["loader"], BASELINE)
    rows = []
    for backend, entry in results["loader"].items():
        if "skipped" in entry:
            rows.append([backend, "-", "-", "-", "-", "-", f"skipped: {entry['skipped']}"])
            continue
        best = entry["best"]["workers"]
        for run in entry["runs"]:
            ratio = safe_ratio(run["images_per_s"]["median"], baseline)
            marker = " (best)" if run["workers"] == best and len(entry["runs"]) > 1 else ""
            rows.append([
                backend, str(run["workers"]), "/".join(str(s) for s in entry["scales"]),
                _fmt(run["time_to_first_batch_s"]["median"], ".2f"), _spread(run["images_per_s"]),
                _spread(run["batches_per_s"], ".1f"),
                ("-" if ratio is None else _fmt(ratio, ".2f") + "x") + marker,
            ])
    return rows


def _training_lines(results: dict) -> list[str]:
    training = results.get("training")
    if not training:
        return []
    rows = [["synthetic device tensors (ceiling)", "-", _spread(training["synthetic"]["images_per_s"]), "1.00x", "-"]]
    for backend, entry in training["backends"].items():
        rows.append([backend, str(entry["workers"]), _spread(entry["images_per_s"]),
                     _fmt(entry["vs_synthetic"], ".2f") + "x", _fmt(100 * entry["data_loading_share"], ".0f") + "%"])
    return ["", f"### Training step: {training['model']}", "",
            *_table(["data", "workers", "img/s median (min-max)", "vs synthetic", "time lost to data"], rows)]


def _memory_lines(results: dict) -> list[str]:
    memory = results.get("memory")
    if not memory:
        return []
    rows = []
    for mode in MEMORY_MODES:
        entry = memory[mode]
        allocator = entry.get("allocator_step_bytes")
        rows.append([mode, _fmt(entry["step_bytes"] / BYTES_PER_MIB, ".1f"),
                     _fmt(entry["peak_bytes"] / BYTES_PER_MIB, ".0f"),
                     "-" if allocator is None else _fmt(allocator / BYTES_PER_MIB, ".1f")])
    lines = ["", f"### Peak memory of one training step ({memory['method']})", "",
             *_table(["mode", "step working set MiB", "process/device peak MiB", "tensor allocator MiB"], rows), ""]
    for mode in MEMORY_MODES[1:]:
        line = f"{mode.replace('_', '-')} / naive: {_fmt(memory.get(f'{mode}_vs_naive'), '.2f')}"
        if f"allocator_{mode}_vs_naive" in memory:
            line += f" (tensor allocator: {_fmt(memory[f'allocator_{mode}_vs_naive'], '.2f')})"
        lines.append(line + "  ")
    lines[-1] = lines[-1].rstrip()
    return lines


def _gpu_lines(results: dict) -> list[str]:
    gpu = results.get("gpu", {})
    if "skipped" in gpu:
        return ["", f"GPU sections skipped: {gpu['skipped']}."]
    rows = []
    for name, point in [("decode only", gpu["decode_only"])] + [("multi-scale", p) for p in gpu["sweep"]]:
        measured = f"error: {point['error']}" if "error" in point else _spread(point["images_per_s"])
        rows.append([name, str(point.get("threads", "-")), _fmt(point.get("hw_decoder_load"), ".2f"), measured])
    return ["", "### DALI on the GPU: decode-only ceiling, hw_decoder_load and thread sweeps", "",
            *_table(["pipeline", "threads", "hw_decoder_load", "img/s median (min-max)"], rows)]


def _goal_lines(results: dict) -> list[str]:
    rows = []
    for goal in results.get("goals", []):
        met = {None: "not measured", True: "met", False: "MISSED"}[goal["met"]]
        rows.append([goal["description"], goal["target"], _fmt(goal["measured"], ".2f"), met])
    return ["", "### Goals", "", *_table(["goal", "target", "measured", "result"], rows)]


def format_report(results: dict[str, Any]) -> str:
    """Markdown tables: loaders (every backend and worker count), ratios, training, memory, GPU, goals."""
    ratios = results.get("ratios", {})
    lines = [*_machine_lines(results), _config_line(results), "", "### Loader throughput (no model)", "",
             *_table(["backend", "workers", "scales", "first batch s (median)", "img/s median (min-max)",
                      "batches/s", "vs baseline"], _loader_rows(results)),
             "", "Ratios: " + (", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) or "-")]
    lines += _training_lines(results) + _memory_lines(results) + _gpu_lines(results) + _goal_lines(results)
    return "\n".join(lines) + "\n"
