"""One command that checks a CUDA machine end to end and writes ONE JSON: ``python -m
multiscale_dali.benchmark.gpu_check --out gpu-check.json`` (``make gpu-check``).

Parts, in this order, each reported as ``ok``, ``skipped`` (with the reason) or ``failed`` (with the
error) plus its figures:

* ``pytest_gpu``: ``pytest -m gpu`` of the source checkout's tests, in a subprocess;
* ``train_step``: :class:`~multiscale_dali.training.trainer.MultiScaleTrainer` steps on CUDA as
  ``msdali train`` runs them (AMP auto, i.e. bf16 where supported; channels_last), fed by DALI when it
  is installed and by the torchvision backend otherwise, on synthetic JPEGs; the loss must stay finite;
* ``step_memory``: CUDA peak memory of one naive vs one memory-efficient multi-scale step (whole
  scales, and the largest scale micro-batched), each in a fresh process (:func:`~multiscale_dali.benchmark.memory.measure_step_memory`);
* ``benchmark``: a short ``msdali benchmark --synthetic N`` in a subprocess (``python -m
  multiscale_dali.cli benchmark``); its full JSON is written beside ``--out``.

The whole run is held to a time budget (default 8 minutes, sized for one H100): a part starts only
with at least ``MIN_PART_S`` left, and subprocesses get what remains. Without CUDA every part is
skipped ("no CUDA device") and the command still exits 0, so it can run anywhere; on CUDA it exits 1
when a part failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from multiscale_dali.benchmark.config import BYTES_PER_MIB, DALI, TORCHVISION
from multiscale_dali.benchmark.dataset import BenchData, resolve_data
from multiscale_dali.benchmark.loaders import batch_stream, make_loader
from multiscale_dali.benchmark.machine import describe_machine, usable_cpus
from multiscale_dali.benchmark.memory import MEMORY_MODES, measure_step_memory
from multiscale_dali.benchmark.step import make_trainer
from multiscale_dali.fileio import atomic_write_text, dumps_json
from multiscale_dali.pipelines.factory import dali_installed
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec

log = logging.getLogger(__name__)

SCHEMA = 1
OK, SKIPPED, FAILED = "ok", "skipped", "failed"
NO_CUDA = "no CUDA device"
PARTS: tuple[str, ...] = ("pytest_gpu", "train_step", "step_memory", "benchmark")
# No part starts with less than this left of the budget: even the shortest needs a CUDA context,
# a model and a few steps.
MIN_PART_S = 30.0
# pytest's exit code when no test was selected (here: no test is marked gpu).
PYTEST_NO_TESTS = 5
_OUTPUT_TAIL = 2000
SELF_TEST = "test_gpu_check.py"
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")
_OPTIONAL_DISTS = ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "onnx", "onnxruntime", "timm")


class PartSkipped(Exception):
    """Raised by a part that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class GpuCheckConfig:
    """What the check runs; the defaults fit one H100 in about 8 minutes."""

    model: str = "resnet18"
    scales: tuple[int, ...] = (128, 160, 224)
    batch_size: int = 64
    synthetic: int = 512  # generated JPEGs for the train step and the benchmark
    train_steps: int = 20
    budget_s: float = 480.0
    pytest_timeout_s: float = 240.0
    benchmark_timeout_s: float = 240.0
    tests_dir: Path | None = None  # None: the tests/ folder of the source checkout, if run from one
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown parts to skip {unknown}; parts are {', '.join(PARTS)}")
        for name in ("batch_size", "synthetic", "train_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.scales or list(self.scales) != sorted(set(self.scales)):
            raise ValueError(f"scales must be increasing, got {list(self.scales)}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")


@dataclass(frozen=True)
class PartResult:
    status: str
    seconds: float
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "seconds": round(self.seconds, 1)}
        if self.reason is not None:
            out["reason"] = self.reason
        return {**out, **self.figures}


Part = Callable[[float], dict[str, Any]]  # seconds left of the budget -> figures


def run_parts(parts: Mapping[str, Part], *, budget_s: float,
              clock: Callable[[], float] = time.monotonic) -> dict[str, PartResult]:
    """Run ``parts`` in order within ``budget_s``; a failing part never stops the next one."""
    start = clock()
    results: dict[str, PartResult] = {}
    for name, part in parts.items():
        left = budget_s - (clock() - start)
        if left < MIN_PART_S:
            results[name] = PartResult(SKIPPED, 0.0, f"time budget of {budget_s:.0f}s exhausted")
            continue
        began = clock()
        log.info("gpu-check: %s (%.0fs of the budget left)", name, left)
        status, reason, figures = OK, None, {}
        try:
            figures = part(left)
        except PartSkipped as skipped:
            status, reason = SKIPPED, str(skipped)
        except Exception as err:  # the report must cover every part, whatever one of them raised
            log.exception("gpu-check: %s failed", name)
            status, reason = FAILED, f"{type(err).__name__}: {err}"[-_OUTPUT_TAIL:]
        results[name] = PartResult(status, clock() - began, reason, figures)
    return results


# ---------------------------------------------------------------------------------------- parts
def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line, e.g. ``{"passed": 2, "skipped": 1}``."""
    lines = [line for line in output.splitlines() if _SUMMARY.search(line)]
    if not lines:
        return {}
    counts = {kind: int(count) for count, kind in _SUMMARY.findall(lines[-1])}
    if "error" in counts:
        counts["errors"] = counts.pop("error") + counts.get("errors", 0)
    return counts


def _source_tests() -> Path | None:
    """``tests/`` of the source checkout this package runs from; None for an installed wheel (whose
    site-packages may hold some other project's ``tests``)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.cfg").is_file() and (root / "tests").is_dir():
        return root / "tests"
    return None


def _subprocess_env() -> dict[str, str]:
    """This environment, with the package this process runs from first on PYTHONPATH (as the memory
    probe of benchmark.memory does), so a subprocess measures the same code."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _pytest_part(config: GpuCheckConfig) -> Part:
    def run(left: float) -> dict[str, Any]:
        tests = config.tests_dir or _source_tests()
        if tests is None or not tests.is_dir():
            raise PartSkipped("no tests folder: run from a source checkout (the installed package ships none)")
        # This module's own GPU test runs the whole check: inside the check it would recurse.
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(tests),
                   f"--ignore={tests / SELF_TEST}"]
        done = subprocess.run(command, cwd=tests.parent, capture_output=True, text=True, env=_subprocess_env(),
                              timeout=min(config.pytest_timeout_s, left))
        output = done.stdout + done.stderr
        counts = parse_pytest_summary(output)
        if done.returncode == PYTEST_NO_TESTS:
            raise PartSkipped("no test is marked gpu")
        if done.returncode != 0:
            raise RuntimeError(f"pytest -m gpu exited {done.returncode} {counts}: {output[-_OUTPUT_TAIL:]}")
        return {"counts": counts}
    return run


def _data(config: GpuCheckConfig) -> BenchData:
    return resolve_data(data=None, synthetic=config.synthetic)


def _train_step_part(config: GpuCheckConfig, device: str) -> Part:
    def run(left: float) -> dict[str, Any]:
        data = _data(config)
        backend = DALI if dali_installed() else TORCHVISION
        spec = LoaderSpec(files=data.files, labels=data.labels, schedule=constant_schedule(config.scales),
                          batch_size=config.batch_size, train=True, device=device, num_workers=usable_cpus(),
                          drop_last=True, channels_last=True)
        trainer = make_trainer(model=config.model, num_classes=data.num_classes, scales=config.scales,
                                    device=device)
        loader = make_loader(backend, spec)
        stream = batch_stream(loader)
        try:
            first = next(stream)
            layouts = {s: x.is_contiguous(memory_format=torch.channels_last) for s, x in first.images.items()}
            stream = itertools.chain([first], stream)
            trainer.train_epoch(itertools.islice(stream, 2), 0)  # cuDNN autotuning, allocator warm-up
            record = trainer.train_epoch(itertools.islice(stream, config.train_steps), 1)
        finally:
            loader.close()
        losses = {str(s): m["loss"] for s, m in record.train.items()}
        if record.skipped_steps or not all(math.isfinite(v) for v in losses.values()):
            raise RuntimeError(f"non-finite training loss: {losses}, {record.skipped_steps} steps skipped")
        return {"backend": backend, "model": config.model, "amp_dtype": str(trainer.options.amp_dtype),
                "channels_last_batches": all(layouts.values()), "scales": list(config.scales),
                "batch_size": config.batch_size, "steps": config.train_steps,
                "images_per_s": record.images_per_second, "loss": losses}
    return run


def _memory_part(config: GpuCheckConfig, device: str) -> Part:
    def run(left: float) -> dict[str, Any]:
        data = _data(config)
        result = measure_step_memory(model=config.model, num_classes=data.num_classes, scales=config.scales,
                                          batch_size=config.batch_size, device=device)
        mib = {mode: result[mode]["step_bytes"] / BYTES_PER_MIB for mode in MEMORY_MODES}
        return {"model": config.model, "step_mib": mib, "peak_mib": {
            mode: result[mode]["peak_bytes"] / BYTES_PER_MIB for mode in MEMORY_MODES},
            **{f"{mode}_vs_naive": result[f"{mode}_vs_naive"] for mode in MEMORY_MODES[1:]},
            "method": result["method"]}
    return run


def _benchmark_part(config: GpuCheckConfig, device: str, json_out: Path) -> Part:
    def run(left: float) -> dict[str, Any]:
        command = [sys.executable, "-m", "multiscale_dali.cli", "benchmark", "--synthetic", str(config.synthetic),
                   "--scales", ",".join(map(str, config.scales)), "--batch-size", str(config.batch_size),
                   "--model", config.model, "--iters", "10", "--warmup", "2", "--repeats", "1",
                   "--workers", str(usable_cpus()), "--device", device, "--json", str(json_out)]
        done = subprocess.run(command, capture_output=True, text=True, env=_subprocess_env(),
                              timeout=min(config.benchmark_timeout_s, left))
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-_OUTPUT_TAIL:]
            raise RuntimeError(f"msdali benchmark exited {done.returncode}: {output}")
        results = json.loads(json_out.read_text())
        loaders = {name: entry["best"]["images_per_s"]["median"] for name, entry in results.get("loader", {}).items()
                   if "best" in entry}
        return {"json": str(json_out), "loader_images_per_s": loaders, "ratios": results.get("ratios", {}),
                "goals": results.get("goals", [])}
    return run


# ---------------------------------------------------------------------------------------- the run
def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in ("multiscale-dali", *_OPTIONAL_DISTS):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def benchmark_json_path(out: Path) -> Path:
    """Where the benchmark part's full results go: beside ``out`` (``gpu-check.json`` ->
    ``gpu-check.benchmark.json``)."""
    return out.with_name(f"{out.stem}.benchmark.json")


def _skipped_by_request(left: float) -> dict[str, Any]:
    raise PartSkipped("skipped with --skip")


def run_gpu_check(config: GpuCheckConfig, *, out: Path) -> dict[str, Any]:
    """Run every part (or skip them all without CUDA) and return the report; writes nothing itself
    except the benchmark part's own JSON beside ``out``."""
    cuda = torch.cuda.is_available()
    device = str(torch.device("cuda", 0)) if cuda else "cpu"
    report: dict[str, Any] = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "cuda": cuda, "device": torch.cuda.get_device_name(0) if cuda else None,
                              "machine": describe_machine(device), "versions": _versions(),
                              "config": {"model": config.model, "scales": list(config.scales),
                                         "batch_size": config.batch_size, "synthetic": config.synthetic,
                                         "budget_s": config.budget_s}}
    if not cuda:
        results = {name: PartResult(SKIPPED, 0.0, NO_CUDA) for name in PARTS}
    else:
        parts: dict[str, Part] = {
            "pytest_gpu": _pytest_part(config),
            "train_step": _train_step_part(config, device),
            "step_memory": _memory_part(config, device),
            "benchmark": _benchmark_part(config, device, benchmark_json_path(out)),
        }
        for name in config.skip:
            parts[name] = _skipped_by_request
        results = run_parts(parts, budget_s=config.budget_s)
    report["parts"] = {name: result.to_json() for name, result in results.items()}
    report["ok"] = not any(result.status == FAILED for result in results.values())
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multiscale_dali.benchmark.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    defaults = GpuCheckConfig()
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="The report (JSON).")
    parser.add_argument("--model", default=defaults.model, help="Model of the training and memory parts.")
    parser.add_argument("--synthetic", type=int, default=defaults.synthetic, help="Generated JPEGs to read.")
    parser.add_argument("--budget-s", type=float, default=defaults.budget_s, help="Time budget of the whole run.")
    parser.add_argument("--skip", action="append", choices=PARTS, default=[], help="A part not to run (repeatable).")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when no part failed (all skipped without CUDA), 1 otherwise."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = GpuCheckConfig(model=args.model, synthetic=args.synthetic, budget_s=args.budget_s,
                            skip=tuple(args.skip))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_gpu_check(config, out=out)
    atomic_write_text(out, dumps_json(report, indent=2) + "\n")
    for name, part in report["parts"].items():
        log.info("%-12s %-7s %s", name, part["status"], part.get("reason", ""))
    log.info("report written to %s", out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
