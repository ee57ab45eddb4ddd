"""``msdali benchmark``: loader and training throughput of every backend, measured in one process.

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
``TrainerOptions(memory_efficient=True)``) is measured in a fresh subprocess per mode, see
:func:`measure_step_memory`.

The result is a plain JSON-able dict; :func:`format_report` renders it as Markdown tables.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.fileio import atomic_write_text
from multiscale_dali.constants import DEFAULT_HW_DECODER_LOAD, IMAGENET_MEAN, IMAGENET_STD
from multiscale_dali.pipelines.spec import Loader, LoaderSpec
from multiscale_dali.pipelines.schedule import constant_schedule

log = logging.getLogger(__name__)

DALI = "dali"
DALI_1SCALE = "dali-1scale"
TORCHVISION = "torchvision"
BASELINE = "baseline"
BENCHMARK_BACKENDS: tuple[str, ...] = (DALI, TORCHVISION, BASELINE, DALI_1SCALE)
# Backends that produce every requested scale, so the same multi-scale training step can run on them.
MULTI_SCALE_BACKENDS: tuple[str, ...] = (DALI, TORCHVISION, BASELINE)
RESULTS_SCHEMA = 1

# DataLoader worker counts swept on a CPU-only machine: the main process alone, then one worker per
# core up to two (more workers than cores only adds context switches).
CPU_WORKER_SWEEP_MAX = 2
# hw_decoder_load values swept on a GPU: all on the CUDA/CPU hybrid path (0) to all on the hardware
# JPEG engines (1), with DALI's usual defaults in between.
HW_DECODER_LOADS: tuple[float, ...] = (0.0, 0.5, 0.65, 0.8, 1.0)
# The training step of the benchmark: a consistency term is part of every multi-scale run.
BENCH_CONSISTENCY_WEIGHT = 1.0
BENCH_LR = 1e-3
BENCH_MOMENTUM = 0.9
# The memory probe's warm-up step uses this many samples: enough for BatchNorm statistics, small
# enough that its own peak stays far below the measured step's.
MEMORY_WARMUP_SAMPLES = 2
MEMORY_PROBE_TIMEOUT_S = 900
BYTES_PER_MIB = 2**20
BYTES_PER_KIB = 1024
PAGE_CACHE_READ_BYTES = 1 << 20
# Header reads for the dataset description: enough for a mean, cheap on a large folder.
DESCRIBE_MAX_FILES = 200

# Goals of issue #3, as (key, description, ratio key, comparison, target).
CPU_GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("dali_cpu_vs_baseline", "DALI-CPU 3-scale vs seed baseline", "dali_vs_baseline", ">=", 1.5),
    ("torchvision_vs_baseline", "torchvision decode-once vs seed baseline", "torchvision_vs_baseline", ">=", 1.3),
    ("memory_efficient_vs_naive", "memory-efficient step peak vs naive", "memory_efficient_vs_naive", "<=", 0.5),
)
GPU_GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("dali_vs_best_torchvision", "DALI 3-scale vs torchvision (best workers)", "dali_vs_torchvision", ">=", 3.0),
    ("dali_vs_1scale", "DALI 3-scale vs DALI 1-scale", "dali_vs_dali-1scale", ">=", 0.9),
    ("dali_vs_decode_only", "DALI 3-scale vs DALI decode-only ceiling", "dali_vs_decode_only", ">=", 0.8),
    ("training_dali_vs_synthetic", "training step with DALI vs synthetic tensors",
     "training_dali_vs_synthetic", ">=", 0.95),
    ("memory_efficient_vs_naive", "memory-efficient step peak vs naive", "memory_efficient_vs_naive", "<=", 0.5),
)


# ================================================================================================
# Pure helpers
# ================================================================================================


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


def best_run(runs: Sequence[dict]) -> dict:
    """The run with the highest median images/s."""
    return max(runs, key=lambda run: run["images_per_s"]["median"])


def _best_ips(loader_results: dict, backend: str) -> float | None:
    entry = loader_results.get(backend)
    if not entry or "best" not in entry:
        return None
    return entry["best"]["images_per_s"]["median"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def compute_ratios(results: dict) -> dict[str, float]:
    """Throughput and memory ratios of a results dict; only the ones whose inputs were measured."""
    loader = results.get("loader", {})
    pairs = {
        "dali_vs_baseline": (DALI, BASELINE),
        "torchvision_vs_baseline": (TORCHVISION, BASELINE),
        "dali-1scale_vs_baseline": (DALI_1SCALE, BASELINE),
        "dali_vs_torchvision": (DALI, TORCHVISION),
        "dali_vs_dali-1scale": (DALI, DALI_1SCALE),
    }
    ratios = {name: _ratio(_best_ips(loader, a), _best_ips(loader, b)) for name, (a, b) in pairs.items()}
    decode_only = results.get("gpu", {}).get("decode_only", {})
    if "images_per_s" in decode_only:
        ratios["dali_vs_decode_only"] = _ratio(_best_ips(loader, DALI), decode_only["images_per_s"]["median"])
    training = results.get("training", {}).get("backends", {})
    for backend, entry in training.items():
        ratios[f"training_{backend}_vs_synthetic"] = entry.get("vs_synthetic")
    memory = results.get("memory", {})
    if "memory_efficient_vs_naive" in memory:
        ratios["memory_efficient_vs_naive"] = memory["memory_efficient_vs_naive"]
    return {name: value for name, value in ratios.items() if value is not None}


def evaluate_goals(results: dict) -> list[dict[str, Any]]:
    """Each goal of the results' device class with its measured ratio and whether it was met."""
    ratios = results.get("ratios", {})
    cuda = results.get("config", {}).get("device", "cpu").startswith("cuda")
    goals = []
    for key, description, ratio_key, comparison, target in GPU_GOALS if cuda else CPU_GOALS:
        measured = ratios.get(ratio_key)
        met = None if measured is None else (measured >= target if comparison == ">=" else measured <= target)
        goals.append({"goal": key, "description": description, "target": f"{comparison} {target}",
                      "measured": measured, "met": met})
    return goals


# ================================================================================================
# The seed project's loader ("baseline"): one full open + decode + transform per scale
# ================================================================================================


def open_rgb(path: str) -> Image.Image:
    """Open and decode ``path`` as RGB with PIL; the baseline calls it once per scale (module-level so
    tests can count the calls)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _baseline_transform(scale: int, spec: LoaderSpec) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    # The seed normalised in the 0..1 range after ToTensor; our constants are in pixel units.
    return T.Compose([
        T.RandomResizedCrop(scale, scale=spec.crop_area, ratio=spec.crop_aspect),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ])


class BaselineDataset(Dataset):
    """``(tuple of float [3, s, s] per scale, label)``; every scale re-opens and re-decodes the file."""

    def __init__(self, spec: LoaderSpec, scales: Sequence[int]) -> None:
        self.files = spec.files
        self.labels = spec.labels
        self.scales = tuple(scales)
        self.transforms = [_baseline_transform(s, spec) for s in self.scales]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int]:
        # Deliberately no sharing between scales: this is the cost the decode-once backends remove.
        images = tuple(transform(open_rgb(self.files[index])) for transform in self.transforms)
        return images, int(self.labels[index])


class BaselineLoader:
    """The seed-style loader behind the :class:`~multiscale_dali.pipelines.spec.Loader` protocol.

    Constant schedules only and no sharding (the benchmark runs one process). Given the same
    ``persistent_workers`` and pinned memory as the torchvision backend, so only the per-sample work
    differs.
    """

    backend = BASELINE

    def __init__(self, spec: LoaderSpec) -> None:
        if not spec.schedule.is_constant or spec.num_shards != 1:
            raise ValueError("the baseline loader supports one constant schedule on one shard")
        self.spec = spec
        self._device = torch.device(spec.device)
        self._scales = spec.schedule.final_scales
        self._generator = torch.Generator()
        self._loader: DataLoader | None = DataLoader(
            BaselineDataset(spec, self._scales),
            batch_size=spec.batch_size,
            shuffle=spec.train,
            generator=self._generator,
            num_workers=spec.num_workers,
            pin_memory=self._device.type == "cuda",
            drop_last=spec.drop_last and len(spec.files) >= spec.batch_size,
            persistent_workers=spec.num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self._loader) if self._loader is not None else 0

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        if self._loader is None:
            raise RuntimeError("this BaselineLoader is closed")
        self._generator.manual_seed(self.spec.seed + epoch)
        return self._batches(iter(self._loader))

    def close(self) -> None:
        self._loader = None

    def _batches(self, batches: Iterable) -> Iterator[MultiScaleBatch]:
        non_blocking = self._device.type == "cuda"
        for images, labels in batches:
            moved = {s: t.to(self._device, non_blocking=non_blocking) for s, t in zip(self._scales, images)}
            yield MultiScaleBatch(images=moved, labels=labels.to(self._device, non_blocking=non_blocking))


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


# ================================================================================================
# Configuration and data
# ================================================================================================


@dataclass(frozen=True)
class BenchConfig:
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


@dataclass(frozen=True)
class BenchData:
    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    num_classes: int
    source: str


def resolve_data(*, data: Path | None, synthetic: int | None, cache_dir: Path | None = None) -> BenchData:
    """The files to read: ``data`` (its train split, or every image of a flat folder), ``synthetic``
    JPEGs from the cache, or the embedded texture photos' train split."""
    from multiscale_dali.data.discovery import discover_dataset

    if data is not None and synthetic is not None:
        raise ValueError("give either data or synthetic, not both")
    if synthetic is not None:
        from multiscale_dali.data.synthetic import cached_synthetic_jpegs

        root, source = cached_synthetic_jpegs(count=synthetic, cache_dir=cache_dir), f"synthetic x{synthetic}"
    elif data is not None:
        root, source = Path(data), "user folder"
    else:
        from multiscale_dali.data.embedded import default_dataset

        root, source = default_dataset(cache_dir=cache_dir), "embedded texture photos (train split)"
    splits = discover_dataset(root)
    if splits.explicit_splits or (root / "train").is_dir():
        files, labels = splits.train.files, splits.train.labels
    else:  # a flat ImageFolder was split by discover_dataset: benchmark every image
        parts = (splits.train, splits.val, splits.test)
        files = tuple(f for p in parts for f in p.files)
        labels = tuple(label for p in parts for label in p.labels)
    return BenchData(root=Path(root), files=files, labels=labels, num_classes=splits.num_classes, source=source)


def describe_files(files: Sequence[str]) -> dict[str, Any]:
    """Mean file size and image size (from the headers of at most ``DESCRIBE_MAX_FILES`` files)."""
    sample = list(files)[:DESCRIBE_MAX_FILES]
    sizes = []
    for path in sample:
        with Image.open(path) as image:  # lazy: reads the header only
            sizes.append(image.size)
    return {
        "mean_file_kib": round(statistics.mean(os.path.getsize(p) for p in sample) / BYTES_PER_KIB, 1),
        "mean_width": round(statistics.mean(w for w, _ in sizes)),
        "mean_height": round(statistics.mean(h for _, h in sizes)),
    }


def warm_page_cache(files: Iterable[str]) -> None:
    """Read every file once so no backend pays for the disk the others then get for free."""
    for path in set(files):
        with open(path, "rb") as handle:
            while handle.read(PAGE_CACHE_READ_BYTES):
                pass


# ================================================================================================
# Machine description
# ================================================================================================


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    """Cores this process may run on (affinity and container limits), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * BYTES_PER_KIB / 2**30, 1)
    except OSError:
        pass
    return None


def _package_version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # absent or broken install: the report says so instead of failing
        return None


def _gpu_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def describe_machine(device: str) -> dict[str, Any]:
    """CPU, memory, GPU (on CUDA) and library versions, as plain JSON values."""
    from PIL import features

    machine: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": _package_version("torchvision"),
        "dali": _package_version("nvidia.dali"),
        "pillow": _package_version("PIL"),
        "pillow_libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": _package_version("numpy"),
        "device": device,
        "load_1min_at_start": load_1min(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        machine.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_driver": _gpu_driver(),
            "cuda_runtime": torch.version.cuda,
        })
    return machine


# ================================================================================================
# Measurement: trials, interleaved in rounds
# ================================================================================================


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


# ================================================================================================
# Loader throughput
# ================================================================================================


def load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


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
    _sync(device)
    start = time.perf_counter()
    images = sum(_consume(next(stream), acc) for _ in range(batches))
    _sync(device)
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
        _sync(device)
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


def _loader_case(cfg: BenchConfig, backend: str, spec: LoaderSpec) -> Case:
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
            cases[(backend, workers)] = _loader_case(cfg, backend, cfg.spec(scales=scales, workers=workers))
    trials = run_interleaved(cases, rounds=cfg.repeats)
    for (backend, workers), backend_trials in trials.items():
        results[backend].setdefault("runs", []).append({"workers": workers, **summarize_trials(backend_trials)})
    for entry in results.values():
        if "runs" in entry:
            entry["best"] = best_run(entry["runs"])
    return results


# ================================================================================================
# Training-step throughput
# ================================================================================================


def _task_and_outputs(num_classes: int) -> tuple[str, int]:
    from multiscale_dali.training.losses import num_outputs, resolve_task

    task = resolve_task(num_classes)
    return task, num_outputs(task, num_classes)


def make_trainer(*, model: str, num_classes: int, scales: Sequence[int], device: str,
                 memory_efficient: bool = False, seed: int = 0):
    """A :class:`MultiScaleTrainer` as ``msdali train`` builds it: channels_last, AMP auto, SGD."""
    from multiscale_dali.training.run import resolve_amp
    from multiscale_dali.training.losses import ScaleConsistencyLoss
    from multiscale_dali.models.registry import build_model
    from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

    task, outputs = _task_and_outputs(num_classes)
    torch_device = torch.device(device)
    # Seeded initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(model, num_outputs=outputs)
    net = net.to(torch_device, memory_format=torch.channels_last)
    return MultiScaleTrainer(
        net,
        loss=ScaleConsistencyLoss(task=task, consistency_weight=BENCH_CONSISTENCY_WEIGHT),
        optimizer=torch.optim.SGD(net.parameters(), lr=BENCH_LR, momentum=BENCH_MOMENTUM),
        schedule=constant_schedule(scales),
        options=TrainerOptions(epochs=1, amp_dtype=resolve_amp("auto", torch_device),
                               memory_efficient=memory_efficient),
        device=torch_device,
    )


def synthetic_batch(*, batch_size: int, scales: Sequence[int], num_classes: int, device: str,
                    seed: int = 0) -> MultiScaleBatch:
    """Random normalised images already on the device, laid out like the loaders' (channels_last)."""
    generator = torch.Generator().manual_seed(seed)
    images = {
        s: torch.randn(batch_size, 3, s, s, generator=generator).to(device, memory_format=torch.channels_last)
        for s in scales
    }
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    return MultiScaleBatch(images=images, labels=labels)


class _Counted:
    """Yields ``count`` batches of a stream and tallies their images."""

    def __init__(self, stream: Iterator[MultiScaleBatch], count: int) -> None:
        self.stream, self.count, self.images = stream, count, 0

    def __iter__(self) -> Iterator[MultiScaleBatch]:
        for batch in itertools.islice(self.stream, self.count):
            self.images += batch.batch_size
            yield batch


def training_trial(cfg: BenchConfig, *, model: str, backend: str | None, workers: int = 0) -> Trial:
    """A fresh trainer (and loader, unless ``backend`` is None: synthetic device tensors); time to the
    end of its first step, ``warmup`` untimed steps, then one window of ``iters`` steps.

    ``train_epoch`` starts its clock before it asks for the first batch and synchronises CUDA at the
    end, so loader stalls are inside the measured time.
    """
    start = time.perf_counter()
    trainer = make_trainer(model=model, num_classes=cfg.num_classes, scales=cfg.scales, device=cfg.device,
                           seed=cfg.seed)
    loader = None
    if backend is None:
        stream: Iterator[MultiScaleBatch] = itertools.repeat(synthetic_batch(
            batch_size=cfg.batch_size, scales=cfg.scales, num_classes=cfg.num_classes, device=cfg.device,
            seed=cfg.seed))
    else:
        loader = make_loader(backend, cfg.spec(workers=workers))
        stream = batch_stream(loader)
    try:
        trainer.train_epoch(_Counted(stream, 1), 0)
        first_step_s = time.perf_counter() - start
        if cfg.warmup:
            trainer.train_epoch(_Counted(stream, cfg.warmup), 1)
        counted = _Counted(stream, cfg.iters)
        record = trainer.train_epoch(counted, 2)
    finally:
        if loader is not None:
            stream.close()
            loader.close()
    window = Window(images=counted.images, batches=cfg.iters, seconds=record.seconds, load_1min=load_1min())
    return Trial(first_batch_s=first_step_s, window=window)


SYNTHETIC_SOURCE = "synthetic"


def _training_case(cfg: BenchConfig, model: str, backend: str | None, workers: int) -> Case:
    return lambda: training_trial(cfg, model=model, backend=backend, workers=workers)


def benchmark_training(cfg: BenchConfig, *, model: str, workers: Mapping[str, int]) -> dict[str, Any]:
    """The step on synthetic device tensors (the ceiling) and on each loader of ``workers`` (backend ->
    its best worker count), interleaved in rounds."""
    cases: dict[Hashable, Case] = {SYNTHETIC_SOURCE: _training_case(cfg, model, None, 0)}
    for backend, count in workers.items():
        cases[backend] = _training_case(cfg, model, backend, count)
    trials = run_interleaved(cases, rounds=cfg.repeats)
    ceiling = summarize_trials(trials.pop(SYNTHETIC_SOURCE))
    ceiling_ips = ceiling["images_per_s"]["median"]
    results: dict[str, Any] = {}
    for backend, backend_trials in trials.items():
        run = summarize_trials(backend_trials)
        ips = run["images_per_s"]["median"]
        results[backend] = {"workers": workers[backend], **run,
                            "vs_synthetic": ips / ceiling_ips,
                            # The share of the step's wall time spent waiting for data.
                            "data_loading_share": 1.0 - ips / ceiling_ips}
    return {"model": model, "synthetic": ceiling, "backends": results}


# ================================================================================================
# Peak memory of one training step (fresh subprocess per mode)
# ================================================================================================

MEMORY_MODES: tuple[str, ...] = ("naive", "memory_efficient")
_PROBE_CODE = (
    "import sys; from multiscale_dali.benchmark.core import memory_probe_main; "
    "sys.exit(memory_probe_main(sys.argv[1:]))"
)


def _proc_status_kib(field: str) -> int:
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
                           memory_efficient=request["mode"] == "memory_efficient", seed=request["seed"])
    batch = synthetic_batch(batch_size=request["batch_size"], scales=request["scales"],
                            num_classes=request["num_classes"], device=device, seed=request["seed"])
    small = MultiScaleBatch(images={s: t[:MEMORY_WARMUP_SAMPLES] for s, t in batch.images.items()},
                            labels=batch.labels[:MEMORY_WARMUP_SAMPLES])
    # The warm-up allocates gradients, optimizer state, thread pools and kernel caches, which both
    # modes share: the measured step then shows only its own working memory.
    trainer.train_epoch([small], 0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.train_epoch([batch], 1)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"method": "torch.cuda.max_memory_allocated", "step_bytes": peak - before, "peak_bytes": peak}
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


def _run_probe(request: dict[str, Any]) -> dict[str, Any]:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
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
    """Working memory of one multi-scale step, naive vs. memory-efficient, each in a fresh process.

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
    naive, efficient = results["naive"], results["memory_efficient"]
    results["memory_efficient_vs_naive"] = _ratio(efficient["step_bytes"], naive["step_bytes"])
    if "allocator_step_bytes" in naive:
        results["allocator_memory_efficient_vs_naive"] = _ratio(
            efficient["allocator_step_bytes"], naive["allocator_step_bytes"])
    results["method"] = naive["method"]
    return results


# ================================================================================================
# GPU-only sections
# ================================================================================================


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
        _sync(cfg.device)
        first_batch_s = time.perf_counter() - start
        for _ in range(cfg.warmup):
            pipe.run()
        _sync(cfg.device)
        begin = time.perf_counter()
        images = sum(len(pipe.run()[0]) for _ in range(cfg.iters))
        _sync(cfg.device)
        seconds = time.perf_counter() - begin
    finally:
        del pipe
    return Trial(first_batch_s=first_batch_s,
                 window=Window(images=images, batches=cfg.iters, seconds=seconds, load_1min=load_1min()))


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
        cases[(count, load)] = _loader_case(cfg, DALI, cfg.spec(workers=count, hw_decoder_load=load))
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


# ================================================================================================
# Entry point
# ================================================================================================


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
    files, labels = repeat_to_fill(chosen.files, chosen.labels, min_samples=samples_needed(
        batch_size=batch_size, warmup=warmup, iters=iters))
    cpus = usable_cpus()
    cfg = BenchConfig(
        files=files, labels=labels, num_classes=chosen.num_classes, scales=tuple(scales),
        batch_size=batch_size, device=device, iters=iters, warmup=warmup, repeats=repeats,
        worker_counts=tuple(workers or default_worker_counts(cpu_count=cpus, cuda=device.startswith("cuda"))),
        dali_threads=dali_threads or cpus, seed=seed,
    )
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


def save_results(results: dict[str, Any], path: Path) -> None:
    """Write the results as indented JSON."""
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")


# ================================================================================================
# Report
# ================================================================================================


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
    baseline = _best_ips(results["loader"], BASELINE)
    rows = []
    for backend, entry in results["loader"].items():
        if "skipped" in entry:
            rows.append([backend, "-", "-", "-", "-", "-", f"skipped: {entry['skipped']}"])
            continue
        best = entry["best"]["workers"]
        for run in entry["runs"]:
            ratio = _ratio(run["images_per_s"]["median"], baseline)
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
             *_table(["mode", "step working set MiB", "process/device peak MiB", "tensor allocator MiB"], rows), "",
             f"memory-efficient / naive: {_fmt(memory['memory_efficient_vs_naive'], '.2f')}"]
    if "allocator_memory_efficient_vs_naive" in memory:
        lines[-1] += f" (tensor allocator: {_fmt(memory['allocator_memory_efficient_vs_naive'], '.2f')})"
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
