"""What a run start costs on a folder of very many files: ``python -m multiscale_dali.benchmark.file_tree``.

Phases, timed in this order in one process and written as one JSON:

* ``make``: write the tree (:func:`~multiscale_dali.data.tiny_tree.write_tiny_jpeg_tree`), only with ``--make``;
* ``discover``: :func:`~multiscale_dali.data.discovery.discover_dataset` (list, sort, split);
* ``fingerprint``: the hash of every split's files the ranks compare (``run_data.splits_fingerprint``);
* ``first_scan``: the pre-flight scan ``msdali train`` runs (``run_data.vet_splits``) against an
  empty cache, only with ``--first-scan`` (it decodes every file);
* ``cached_check``: the same pre-flight scan again, every verdict from the cache (the cost paid at
  every run start on an unchanged tree); ``--repeat`` runs it several times, the best is reported;
* ``scan_tree``: ``msdali scan``'s whole-tree scan from the cache (``scan_tree``);
* ``first_batch``: build a DALI-CPU training loader on the train split and take its first batch.

The scan cache lives under ``$MSDALI_CACHE`` (set it to a fresh folder to start from an empty cache).
The module uses only APIs that predate it apart from the generator, so the same file run with an
older checkout first on ``PYTHONPATH`` measures that checkout ("before" figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("first_scan", "cached_check", "scan_tree", "first_batch")
# The loader of the first-batch phase: small batches and one scale, so the figure is the cost of
# reaching the first batch (reader set-up over every file), not of decoding many images.
FIRST_BATCH_SIZE: int = 32
FIRST_BATCH_SCALE: int = 32


def _timed(figures: dict[str, Any], phase: str, func: Callable[[], Any]) -> Any:
    """Run ``func``; record its wall-clock seconds as ``<phase>_s`` and the CPU seconds of this
    process (every thread) as ``<phase>_cpu_s``: on a shared machine the CPU time is the steadier
    figure, the wall-clock time the one a user waits for."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = func()
    figures[f"{phase}_s"] = time.perf_counter() - wall
    figures[f"{phase}_cpu_s"] = time.process_time() - cpu
    log.info("%s: %.2f s (%.2f s CPU)", phase, figures[f"{phase}_s"], figures[f"{phase}_cpu_s"])
    return value


def _first_batch(splits: Any, workers: int) -> float:
    """Seconds from a DALI-CPU training loader's construction to its first batch (imports excluded:
    a run pays them whatever the dataset's size)."""
    import importlib

    from multiscale_dali.pipelines.factory import build_loader
    from multiscale_dali.pipelines.schedule import constant_schedule
    from multiscale_dali.pipelines.spec import LoaderSpec

    importlib.import_module("multiscale_dali.pipelines.dali.loader")
    spec = LoaderSpec(files=splits.train.files, labels=splits.train.labels,
                      schedule=constant_schedule([FIRST_BATCH_SCALE]), batch_size=FIRST_BATCH_SIZE, train=True,
                      device="cpu", num_workers=workers, drop_last=True)
    start = time.perf_counter()
    loader = build_loader(spec, backend="dali")
    try:
        next(iter(loader.epoch(0)))
        return time.perf_counter() - start
    finally:
        loader.close()


def measure(root: Path, *, phases: Sequence[str], repeat: int, workers: int) -> dict[str, Any]:
    """Seconds per phase (see the module docstring) on the tree at ``root``."""
    from multiscale_dali.data.discovery import discover_dataset
    from multiscale_dali.training.config import TrainConfig
    from multiscale_dali.training.run_data import scan_cache_path, splits_fingerprint, vet_splits

    config = TrainConfig(data=str(root), workers=workers)
    figures: dict[str, Any] = {}
    splits = _timed(figures, "discover", lambda: discover_dataset(root))
    figures["files"] = sum(len(splits.split(name)) for name in ("train", "val", "test"))
    _timed(figures, "fingerprint", lambda: splits_fingerprint(splits))
    if "first_scan" in phases:
        _timed(figures, "first_scan", lambda: vet_splits(splits, config))
    if "cached_check" in phases:
        runs = []
        for _ in range(max(1, repeat)):
            _timed(figures, "cached_check", lambda: vet_splits(splits, config))
            runs.append((figures["cached_check_s"], figures["cached_check_cpu_s"]))
        figures["cached_check_s"] = min(wall for wall, _ in runs)
        figures["cached_check_cpu_s"] = min(cpu for _, cpu in runs)
        figures["cached_check_runs"] = runs
    if "scan_tree" in phases:
        from multiscale_dali.data.scan import scan_tree

        _timed(figures, "scan_tree", lambda: scan_tree(root, cache_path=scan_cache_path(root), workers=workers))
    if "first_batch" in phases:
        figures["first_batch_s"] = _first_batch(splits, workers)
        log.info("first batch: %.2f s", figures["first_batch_s"])
    return figures


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multiscale_dali.benchmark.file_tree",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="The tree (written there with --make).")
    parser.add_argument("--make", action="store_true", help="Write the tree first (--root must not exist).")
    parser.add_argument("--files", type=int, default=1_000_000, help="Files to write with --make.")
    parser.add_argument("--classes", type=int, default=1000, help="Class folders to write with --make.")
    parser.add_argument("--first-scan", action="store_true", help="Also time the uncached first scan.")
    parser.add_argument("--skip", action="append", choices=PHASES, default=[], help="A phase not to run.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of the cached check (the best is kept).")
    parser.add_argument("--workers", type=int, default=2, help="Scan threads and DALI CPU threads.")
    parser.add_argument("--out", type=Path, required=True, help="The figures (JSON).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import multiscale_dali

    report: dict[str, Any] = {"root": str(args.root), "python": platform.python_version(),
                              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                              "code": os.path.dirname(os.path.dirname(os.path.abspath(multiscale_dali.__file__)))}
    if args.make:
        from multiscale_dali.data.tiny_tree import write_tiny_jpeg_tree

        tree = _timed(report, "make", lambda: write_tiny_jpeg_tree(args.root, files=args.files, classes=args.classes))
        report["linked"] = tree.linked
    phases = [p for p in PHASES if p not in args.skip and (p != "first_scan" or args.first_scan)]
    report.update(measure(args.root, phases=phases, repeat=args.repeat, workers=args.workers))
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("figures written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
