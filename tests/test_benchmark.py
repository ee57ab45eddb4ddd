"""``msdali benchmark``: report shape, method invariants and the synthetic data. No timing assertions:
the numbers of a 2-core CI box say nothing; what must hold is that every section is measured and
reported the same way for every backend."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from multiscale_dali.benchmark import baseline, report
from multiscale_dali.benchmark.baseline import BaselineLoader
from multiscale_dali.benchmark.config import (
    BASELINE,
    DALI,
    DALI_1SCALE,
    TORCHVISION,
    BenchConfig,
    default_worker_counts,
    repeat_to_fill,
    samples_needed,
)
from multiscale_dali.benchmark.core import format_report, run_benchmark
from multiscale_dali.benchmark.goals import compute_ratios, evaluate_goals
from multiscale_dali.benchmark.gpu import dali_sweeps
from multiscale_dali.benchmark.loaders import loader_trial
from multiscale_dali.benchmark.measure import Trial, Window, run_interleaved, summarize, throughput
from multiscale_dali.benchmark.memory import probe_env
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.pipelines.factory import dali_installed
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.data.synthetic import cached_synthetic_jpegs, synthetic_photo, write_synthetic_jpegs

TINY_SIZE = (96, 72)
TINY_COUNT = 12
SCALES = (32, 48, 64)
BATCH = 4

needs_dali = pytest.mark.skipif(not dali_installed(), reason="DALI is not installed")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_jpegs(tmp_path_factory.mktemp("bench") / "images", count=TINY_COUNT, size=TINY_SIZE)


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jpg"))}


# ------------------------------------------------------------------------------------ synthetic data


def test_synthetic_jpegs_are_a_deterministic_imagefolder(tmp_path: Path) -> None:
    first = write_synthetic_jpegs(tmp_path / "a", count=5, size=(40, 30), classes=2, seed=3)
    again = write_synthetic_jpegs(tmp_path / "b", count=5, size=(40, 30), classes=2, seed=3)
    other = write_synthetic_jpegs(tmp_path / "c", count=5, size=(40, 30), classes=2, seed=4)
    assert sorted(p.name for p in first.iterdir()) == ["class_00", "class_01"]
    assert len(list((first / "class_00").glob("*.jpg"))) == 3
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)
    with Image.open(next((first / "class_01").glob("*.jpg"))) as image:
        assert image.size == (40, 30) and image.mode == "RGB" and image.format == "JPEG"


def _jpeg_bytes(pixels: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.tell()


def test_synthetic_photos_compress_like_photos_not_flat_colour() -> None:
    pixels = synthetic_photo(size=(200, 150), seed=0, index=0, label=0, classes=2)
    flat = np.full_like(pixels, 128)
    # Photo-like content keeps the DCT busy: many times the bytes of a flat image, and real spread.
    assert _jpeg_bytes(pixels) > 10 * _jpeg_bytes(flat)
    assert pixels.std() > 20


def test_cached_synthetic_jpegs_reuses_the_folder(tmp_path: Path) -> None:
    first = cached_synthetic_jpegs(count=3, size=(32, 24), cache_dir=tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*.jpg")}
    assert cached_synthetic_jpegs(count=3, size=(32, 24), cache_dir=tmp_path) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.jpg")} == stamp
    assert cached_synthetic_jpegs(count=4, size=(32, 24), cache_dir=tmp_path) != first


def test_synthetic_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count"):
        write_synthetic_jpegs(tmp_path, count=0)
    with pytest.raises(ValueError, match="classes"):
        write_synthetic_jpegs(tmp_path, count=2, classes=3)


# ------------------------------------------------------------------------------------ pure helpers


def test_summaries_and_throughput() -> None:
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    result = throughput([Window(images=8, batches=2, seconds=1.0), Window(images=8, batches=2, seconds=2.0),
                         Window(images=8, batches=2, seconds=4.0)])
    assert result["images_per_s"] == {"median": 4.0, "min": 2.0, "max": 8.0}
    assert result["batches_per_s"]["median"] == 1.0
    with pytest.raises(ValueError):
        throughput([Window(images=1, batches=1, seconds=0.0)])


def test_worker_sweeps() -> None:
    assert default_worker_counts(cpu_count=2, cuda=False) == (0, 1, 2)
    assert default_worker_counts(cpu_count=1, cuda=False) == (0, 1)
    assert default_worker_counts(cpu_count=16, cuda=True) == (1, 2, 4, 8, 16)
    assert default_worker_counts(cpu_count=12, cuda=True) == (1, 2, 4, 8, 12)


def test_repeat_to_fill_keeps_pairs_and_covers_the_measurement() -> None:
    need = samples_needed(batch_size=4, warmup=1, iters=6)
    assert need == (1 + 1 + 6) * 4
    files, labels = repeat_to_fill(["a", "b", "c"], [0, 1, 0], min_samples=need)
    assert len(files) >= need and len(files) % 3 == 0
    assert list(zip(files, labels))[:6] == [("a", 0), ("b", 1), ("c", 0)] * 2
    assert repeat_to_fill(["a"], [0], min_samples=1) == (("a",), (0,))


def _fake_results(device: str = "cpu") -> dict:
    def loader(ips: float) -> dict:
        run = {"workers": 1, "images_per_s": {"median": ips, "min": ips, "max": ips}}
        return {"runs": [run], "best": run}

    return {
        "config": {"device": device},
        "loader": {DALI: loader(300.0), TORCHVISION: loader(200.0), BASELINE: loader(100.0),
                   DALI_1SCALE: loader(400.0)},
        "training": {"backends": {DALI: {"vs_synthetic": 0.97}}},
        "memory": {"memory_efficient_vs_naive": 0.6, "micro_batched_vs_naive": 0.6,
                   "allocator_micro_batched_vs_naive": 0.6, "allocator_memory_efficient_vs_naive": 0.45},
    }


def test_ratios_and_goals_from_results() -> None:
    results = _fake_results()
    results["ratios"] = compute_ratios(results)
    assert results["ratios"]["dali_vs_baseline"] == pytest.approx(3.0)
    assert results["ratios"]["torchvision_vs_baseline"] == pytest.approx(2.0)
    assert results["ratios"]["dali_vs_dali-1scale"] == pytest.approx(0.75)
    goals = {g["goal"]: g for g in evaluate_goals(results)}
    assert goals["dali_cpu_vs_baseline"]["met"] is True
    assert goals["memory_efficient_vs_naive"]["met"] is False
    assert goals["exact_memory_efficient_vs_naive"]["met"] is True  # each path is held to the goal on its own

    gpu = _fake_results("cuda:0")
    gpu["ratios"] = compute_ratios(gpu)
    gpu_goals = {g["goal"]: g for g in evaluate_goals(gpu)}
    assert gpu_goals["dali_vs_best_torchvision"]["met"] is False  # 1.5x < 3x
    assert gpu_goals["training_dali_vs_synthetic"]["met"] is True
    assert gpu_goals["dali_vs_decode_only"]["met"] is None  # not measured


# ------------------------------------------------------------------------------------ method


class _ShortEpochLoader:
    """Two batches per epoch; records which epochs were asked for."""

    backend = "fake"

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.closed = False

    def __len__(self) -> int:
        return 2

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        self.epochs.append(epoch)
        for _ in range(2):
            yield MultiScaleBatch(images={s: torch.zeros(BATCH, 3, s, s) for s in SCALES},
                                  labels=torch.zeros(BATCH, dtype=torch.long))

    def close(self) -> None:
        self.closed = True


def test_loader_trial_times_only_the_window_and_crosses_epochs() -> None:
    fake = _ShortEpochLoader()
    trial = loader_trial(lambda: fake, device="cpu", warmup=1, iters=3)
    assert (trial.window.batches, trial.window.images) == (3, 3 * BATCH)
    assert fake.epochs == [0, 1, 2]  # 1 first + 1 warm-up + 3 timed = 5 batches over 3 epochs
    assert fake.closed
    assert trial.first_batch_s >= 0 and trial.window.seconds > 0


def test_run_interleaved_alternates_cases_and_records_failures() -> None:
    order: list[str] = []

    def case(name: str):
        def run() -> Trial:
            order.append(name)
            if name == "bad":
                raise RuntimeError("no hardware decoder")
            return Trial(first_batch_s=0.1, window=Window(images=4, batches=1, seconds=1.0))
        return run

    results = run_interleaved({"a": case("a"), "bad": case("bad"), "b": case("b")}, rounds=3,
                              tolerate=(RuntimeError,))
    assert order == ["a", "bad", "b", "a", "b", "a", "b"]  # a failed case is not retried
    assert len(results["a"]) == 3 and len(results["b"]) == 3
    assert results["bad"] == "RuntimeError: no hardware decoder"
    with pytest.raises(RuntimeError):
        run_interleaved({"bad": case("bad")}, rounds=1)


def test_memory_probe_imports_this_copy_of_the_package() -> None:
    import multiscale_dali

    first = probe_env()["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(first) / "multiscale_dali" == Path(multiscale_dali.__file__).resolve().parent


def _tiny_spec(folder: Path, *, workers: int = 0) -> LoaderSpec:
    files = tuple(sorted(str(p) for p in folder.rglob("*.jpg")))
    return LoaderSpec(files=files, labels=tuple(int(Path(f).parent.name[-2:]) for f in files),
                      schedule=constant_schedule(SCALES), batch_size=BATCH, train=True, num_workers=workers)


def test_baseline_decodes_the_file_once_per_scale(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_open = baseline.open_rgb

    def counting_open(path: str) -> Image.Image:
        calls.append(path)
        return real_open(path)

    monkeypatch.setattr(baseline, "open_rgb", counting_open)
    loader = BaselineLoader(_tiny_spec(tiny_folder))
    try:
        batches = list(loader.epoch(0))
    finally:
        loader.close()
    assert len(batches) == TINY_COUNT // BATCH
    assert len(calls) == TINY_COUNT * len(SCALES)
    assert all(calls.count(path) == len(SCALES) for path in set(calls))
    batch = batches[0]
    assert batch.scales == SCALES
    assert all(batch.images[s].shape == (BATCH, 3, s, s) and batch.images[s].dtype == torch.float32 for s in SCALES)


@needs_dali
def test_dali_sweeps_and_decode_only_run_on_cpu(tiny_folder: Path) -> None:
    """The GPU-only section's code path, exercised on CPU operators (hw_decoder_load is ignored there)."""
    files = tuple(sorted(str(p) for p in tiny_folder.rglob("*.jpg")))
    files, labels = repeat_to_fill(files, [0] * len(files), min_samples=samples_needed(batch_size=BATCH, warmup=1,
                                                                                        iters=2))
    cfg = BenchConfig(files=files, labels=labels, num_classes=2, scales=SCALES, batch_size=BATCH,
                      device="cpu", iters=2, warmup=1, repeats=2, worker_counts=(0,), dali_threads=2)
    gpu = dali_sweeps(cfg, threads=(1, 2), hw_decoder_loads=(0.65,))
    assert _positive_stats(gpu["decode_only"]["images_per_s"])
    assert sorted((p["threads"], p["hw_decoder_load"]) for p in gpu["sweep"]) == [(1, 0.65), (2, 0.65)]
    assert all(_positive_stats(p["images_per_s"]) and len(p["windows"]) == 2 for p in gpu["sweep"])
    results = {**_fake_results("cuda:0"), "gpu": gpu}
    assert compute_ratios(results)["dali_vs_decode_only"] > 0
    assert "decode only" in report._gpu_lines(results)[-len(gpu["sweep"]) - 1]


def test_run_benchmark_rejects_bad_arguments(tiny_folder: Path) -> None:
    common = dict(data=tiny_folder, scales=SCALES, batch_size=BATCH, model=None, iters=1, device="cpu",
                  workers=(0,), warmup=0, repeats=1, synthetic=None)
    with pytest.raises(ValueError, match="unknown backend"):
        run_benchmark(backends=("ffcv",), **common)
    with pytest.raises(ValueError, match="either data or synthetic"):
        run_benchmark(backends=(BASELINE,), **{**common, "synthetic": 4})
    with pytest.raises(ValueError, match="increasing"):
        run_benchmark(backends=(BASELINE,), **{**common, "scales": (64, 32)})


def test_missing_dali_is_reported_not_fatal(tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("multiscale_dali.pipelines.factory.dali_installed", lambda: False)
    results = run_benchmark(data=tiny_folder, scales=SCALES, batch_size=BATCH, backends=(DALI, BASELINE),
                            model=None, iters=1, device="cpu", workers=(0,), warmup=0, repeats=1, synthetic=None)
    assert results["loader"][DALI]["skipped"] == "DALI is not installed"
    assert "best" in results["loader"][BASELINE]
    assert "training" not in results and "memory" not in results
    assert "skipped: DALI is not installed" in format_report(results)


# ------------------------------------------------------------------------------------ full run


@pytest.fixture(scope="module")
def full_results(tiny_folder: Path) -> dict:
    backends = (DALI, TORCHVISION, BASELINE) if dali_installed() else (TORCHVISION, BASELINE)
    return run_benchmark(data=tiny_folder, scales=SCALES, batch_size=BATCH, backends=backends,
                         model="tiny_cnn", iters=2, device="cpu", workers=(0, 1), warmup=1, repeats=2,
                         synthetic=None)


def _positive_stats(stats: dict) -> bool:
    return all(stats[k] > 0 for k in ("median", "min", "max")) and stats["min"] <= stats["median"] <= stats["max"]


@pytest.mark.slow  # the shared full run takes ~15-40 s on a 2-core box
def test_full_report_shape(full_results: dict) -> None:
    results = json.loads(json.dumps(full_results))  # JSON-able, and what a saved file reads back as
    assert results["config"]["scales"] == list(SCALES)
    expected = {TORCHVISION, BASELINE} | ({DALI, DALI_1SCALE} if dali_installed() else set())
    assert set(results["loader"]) == expected
    for backend, entry in results["loader"].items():
        workers = [run["workers"] for run in entry["runs"]]
        assert workers == ([0, 1] if backend in (TORCHVISION, BASELINE) else [results["config"]["dali_threads"]])
        for run in entry["runs"]:
            assert _positive_stats(run["images_per_s"]) and _positive_stats(run["batches_per_s"])
            assert _positive_stats(run["time_to_first_batch_s"])
            assert [w["batches"] for w in run["windows"]] == [2, 2]
        assert entry["best"] in entry["runs"]
    if dali_installed():
        assert results["loader"][DALI_1SCALE]["scales"] == [max(SCALES)]
        assert results["ratios"]["dali_vs_baseline"] > 0 and results["ratios"]["dali_vs_dali-1scale"] > 0
    assert results["ratios"]["torchvision_vs_baseline"] > 0


@pytest.mark.slow  # the shared full run takes ~15-40 s on a 2-core box
def test_full_report_machine_training_memory_and_gpu(full_results: dict) -> None:
    machine = full_results["machine"]
    for key in ("cpu_model", "cpu_count", "python", "torch", "torchvision", "pillow", "dali"):
        assert key in machine
    assert machine["usable_cpus"] >= 1 and "gpu" not in machine

    training = full_results["training"]
    assert training["model"] == "tiny_cnn" and _positive_stats(training["synthetic"]["images_per_s"])
    for entry in training["backends"].values():
        assert _positive_stats(entry["images_per_s"])
        assert entry["data_loading_share"] == pytest.approx(1 - entry["vs_synthetic"])

    memory = full_results["memory"]
    for mode in ("naive", "memory_efficient", "micro_batched"):
        assert memory[mode]["step_bytes"] > 0 and memory[mode]["peak_bytes"] > 0
        assert memory[mode]["allocator_step_bytes"] > 0
    assert memory["memory_efficient_vs_naive"] > 0 and memory["micro_batched_vs_naive"] > 0
    # Fewer activations alive at once: the allocator's exact count must show it. The largest scale in
    # chunks (tiny_cnn has BatchNorm, so only the opt-in mode) is never above it in checkpointed segments
    # (the exact mode); at the test's small sizes both can reach the same floor, the next scale's graph.
    assert memory["allocator_micro_batched_vs_naive"] <= memory["allocator_memory_efficient_vs_naive"] < 1
    assert full_results["ratios"]["allocator_micro_batched_vs_naive"] == memory["allocator_micro_batched_vs_naive"]
    assert "skipped" in full_results["gpu"]
    assert {g["goal"] for g in full_results["goals"]} == {
        "dali_cpu_vs_baseline", "torchvision_vs_baseline", "memory_efficient_vs_naive",
        "exact_memory_efficient_vs_naive"}


@pytest.mark.slow  # the shared full run takes ~15-40 s on a 2-core box
def test_format_report_mentions_every_backend_and_section(full_results: dict) -> None:
    report = format_report(full_results)
    for backend in full_results["loader"]:
        assert f"| {backend} |" in report
    for heading in ("Loader throughput", "Training step: tiny_cnn", "Peak memory", "Goals", "GPU sections skipped"):
        assert heading in report
    assert full_results["machine"]["cpu_model"] in report


def test_benchmark_command_prints_every_backend_and_writes_json(tiny_folder: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from multiscale_dali.cli.main import main

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "benchmark", "--data", str(tiny_folder), "--scales", "32,48", "--batch-size", "4", "--iters", "2",
        "--warmup", "0", "--repeats", "1", "--workers", "0", "--model", "none", "--backends",
        "torchvision,baseline", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "torchvision" in result.output and "baseline" in result.output
    report = json.loads(out.read_text())
    assert {"machine", "loader", "ratios"} <= set(report)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] == torch.__version__


def test_benchmark_command_names_a_bad_backend(tiny_folder: Path) -> None:
    from click.testing import CliRunner

    from multiscale_dali.cli.main import main

    result = CliRunner().invoke(main, ["benchmark", "--data", str(tiny_folder), "--backends", "opencv"])
    assert result.exit_code == 2 and "opencv" in result.output
