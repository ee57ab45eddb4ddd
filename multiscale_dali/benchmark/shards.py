"""``msdali benchmark --data SHARDS``: a pack against the same images as a folder, in one run.

The folder is the one the pack was made from (recorded in its manifest) or ``compare_folder``; its
train split is rebuilt with the pack's seed and split fractions, less the files the pack left out,
so both sides hold the very same images. Each backend reads each side with the same spec (train
geometry, scales, batch size, seed, worker count), neither side repeated: epochs have the same
length on both, so epoch boundaries cost both the same. Cases run in interleaved rounds (see
``measure.run_interleaved``), each a fresh loader, after every file and tar was read once to warm
the page cache. The ratio is shard img/s over folder img/s: the median of the per-round ratios
(each round measures both sides under the same background load), with min and max.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Sequence

from multiscale_dali.benchmark.config import DALI, TORCHVISION, default_worker_counts
from multiscale_dali.benchmark.dataset import describe_files, warm_page_cache
from multiscale_dali.benchmark.loaders import loader_trial, make_loader
from multiscale_dali.benchmark.machine import describe_machine, usable_cpus
from multiscale_dali.benchmark.measure import Case, load_1min, run_interleaved, summarize, summarize_trials
from multiscale_dali.constants import DEFAULT_SPLIT_FRACTIONS
from multiscale_dali.data.discovery import DataError, discover_dataset
from multiscale_dali.data.packed import load_packed
from multiscale_dali.data.shard_format import Manifest
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec, ShardSource

__all__ = ["SHARD_RATIO_GOAL", "folder_of_pack", "run_shard_benchmark", "format_shard_report"]

# Reading a pack should cost no throughput against reading the same images as files.
SHARD_RATIO_GOAL = 0.95
SOURCES = ("folder", "shards")
_SPLIT = "train"


def folder_of_pack(manifest: Manifest, folder: Path | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The files and labels of the pack's train split in ``folder`` (default: the pack's source).

    ``DataError`` when the folder is not there or does not hold the same number of images.
    """
    root = Path(folder) if folder is not None else Path(manifest.source_root)
    flag = "--compare-folder" if folder is not None else "the pack's source folder"
    if not root.is_dir():
        raise DataError(f"{flag} {root} is not a directory: give the folder the pack was made from with "
                        f"--compare-folder")
    fractions = manifest.split_fractions or DEFAULT_SPLIT_FRACTIONS
    split = discover_dataset(root, fractions=fractions, seed=manifest.seed).split(_SPLIT)
    left_out = {os.path.abspath(f.path) for f in manifest.scan.skipped}
    kept = [(f, label) for f, label in zip(split.files, split.labels) if os.path.abspath(f) not in left_out]
    packed = manifest.split(_SPLIT).samples
    if len(kept) != packed:
        raise DataError(f"the {_SPLIT} split of {root} has {len(kept)} images, the pack {manifest.directory} "
                        f"{packed}: not the same images (another folder, or changed since it was packed)")
    return tuple(f for f, _ in kept), tuple(label for _, label in kept)


def _spec(source: dict, *, scales: Sequence[int], batch_size: int, device: str, workers: int) -> LoaderSpec:
    return LoaderSpec(**source, schedule=constant_schedule(scales), batch_size=batch_size, train=True,
                      device=device, num_workers=workers, drop_last=True, channels_last=True)


def _cases(sources: dict[str, dict], plan: dict[str, tuple[int, ...]], *, scales: Sequence[int], batch_size: int,
           device: str, warmup: int, iters: int) -> dict[Hashable, Case]:
    cases: dict[Hashable, Case] = {}
    for backend, worker_counts in plan.items():
        for workers in worker_counts:
            for name, source in sources.items():
                spec = _spec(source, scales=scales, batch_size=batch_size, device=device, workers=workers)
                cases[(backend, workers, name)] = (
                    lambda b=backend, s=spec: loader_trial(lambda: make_loader(b, s), device=device, warmup=warmup,
                                                           iters=iters))
    return cases


def _compare(trials: dict[Hashable, Any], plan: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """One row per backend and worker count: both sides' summaries and the shard/folder ratio."""
    rows = []
    for backend, worker_counts in plan.items():
        for workers in worker_counts:
            folder, shards = (trials[(backend, workers, name)] for name in SOURCES)
            paired = [s.window.images / s.window.seconds / (f.window.images / f.window.seconds)
                      for f, s in zip(folder, shards)]
            rows.append({"backend": backend, "workers": workers, "folder": summarize_trials(folder),
                         "shards": summarize_trials(shards), "shards_vs_folder": summarize(paired)})
    return rows


def _plan(backends: Sequence[str], *, workers: Sequence[int] | None, device: str, dali_threads: int) -> dict:
    from multiscale_dali.pipelines.factory import dali_installed

    plan: dict[str, tuple[int, ...]] = {}
    if DALI in backends and dali_installed():
        plan[DALI] = (dali_threads,)
    if TORCHVISION in backends:
        plan[TORCHVISION] = tuple(workers or default_worker_counts(cpu_count=usable_cpus(),
                                                                    cuda=device.startswith("cuda")))
    if not plan:
        raise ValueError("a shard benchmark needs the dali (installed) or torchvision backend")
    return plan


def run_shard_benchmark(
    *, pack: Path, compare_folder: Path | None, scales: Sequence[int], batch_size: int, backends: Sequence[str],
    iters: int, warmup: int, repeats: int, device: str, workers: Sequence[int] | None = None,
    dali_threads: int | None = None,
) -> dict[str, Any]:
    """Loader throughput on the pack's train split and on the same images as files (module docstring)."""
    from multiscale_dali.training.distributed import resolve_device

    device = str(resolve_device(device))
    manifest = load_packed(pack).manifest
    files, labels = folder_of_pack(manifest, compare_folder)
    sources = {"folder": {"files": files, "labels": labels},
               "shards": {"files": (), "labels": (), "shards": ShardSource(manifest=manifest, split=_SPLIT)}}
    plan = _plan(backends, workers=workers, device=device, dali_threads=dali_threads or usable_cpus())
    warm_page_cache([*files, *map(str, manifest.shard_paths(_SPLIT)), *map(str, manifest.index_paths(_SPLIT))])
    machine = describe_machine(device)
    trials = run_interleaved(_cases(sources, plan, scales=scales, batch_size=batch_size, device=device,
                                    warmup=warmup, iters=iters), rounds=repeats)
    machine["load_1min_at_end"] = load_1min()
    rows = _compare(trials, plan)
    best = {backend: max(r["shards_vs_folder"]["median"] for r in rows if r["backend"] == backend) for backend in plan}
    return {
        "config": {"scales": list(scales), "batch_size": batch_size, "device": device, "iters": iters,
                   "warmup": warmup, "repeats": repeats, "plan": {k: list(v) for k, v in plan.items()}},
        "data": {"pack": str(manifest.directory), "folder": str(compare_folder or manifest.source_root),
                 "samples": len(files), "shards": len(manifest.split(_SPLIT).shards),
                 "shard_mib": round(sum(s.bytes for s in manifest.split(_SPLIT).shards) / 2**20, 1),
                 **describe_files(files)},
        "machine": machine,
        "shards_vs_folder": rows,
        "goals": [{"goal": f"{backend}_shards_vs_folder", "description": f"{backend}: shards vs folder img/s",
                   "target": f">= {SHARD_RATIO_GOAL}", "measured": ratio, "met": ratio >= SHARD_RATIO_GOAL}
                  for backend, ratio in best.items()],
    }


def _load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_shard_report(results: dict[str, Any]) -> str:
    """Markdown: what was read, then one row per backend and worker count, then the goals."""
    def spread(stats: dict[str, float], spec: str = ",.0f") -> str:
        return f"{stats['median']:{spec}} ({stats['min']:{spec}}-{stats['max']:{spec}})"

    m, d, c = results["machine"], results["data"], results["config"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['cpu_count']} CPUs; DALI {m['dali']}, "
        f"torch {m['torch']}; 1-min load average {_load(m.get('load_1min_at_start'))} at start, "
        f"{_load(m.get('load_1min_at_end'))} at end",
        f"Data: {d['samples']} train images ({d['mean_width']}x{d['mean_height']} px, {d['mean_file_kib']} KiB) as "
        f"files in {d['folder']} and as {d['shards']} shard(s) ({d['shard_mib']} MiB) in {d['pack']}; scales "
        f"{c['scales']}, batch {c['batch_size']}, device {c['device']}; {c['repeats']} interleaved rounds of "
        f"{c['warmup']} warm-up + {c['iters']} timed batches",
        "", "| backend | workers | folder img/s | shards img/s | shards / folder (per round) |", "|---|---|---|---|---|",
    ]
    for row in results["shards_vs_folder"]:
        lines.append(f"| {row['backend']} | {row['workers']} | {spread(row['folder']['images_per_s'])} | "
                     f"{spread(row['shards']['images_per_s'])} | {spread(row['shards_vs_folder'], '.2f')} |")
    lines += ["", "| goal | target | measured | result |", "|---|---|---|---|"]
    for goal in results["goals"]:
        lines.append(f"| {goal['description']} | {goal['target']} | {goal['measured']:.2f} | "
                     f"{'met' if goal['met'] else 'MISSED'} |")
    return "\n".join(lines) + "\n"
