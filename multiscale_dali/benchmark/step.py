"""Training-step throughput: the :class:`MultiScaleTrainer` step on each loader's batches and on one
batch of random tensors already on the device (the compute ceiling)."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Hashable, Iterator, Mapping, Sequence

import torch

from multiscale_dali.benchmark.config import BenchConfig
from multiscale_dali.benchmark.loaders import batch_stream, make_loader
from multiscale_dali.benchmark.measure import Case, Trial, Window, load_1min, run_interleaved, summarize_trials
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.schedule import constant_schedule

if TYPE_CHECKING:
    from multiscale_dali.training.trainer import MultiScaleTrainer

# The training step of the benchmark: a consistency term is part of every multi-scale run.
BENCH_CONSISTENCY_WEIGHT = 1.0
BENCH_LR = 1e-3
BENCH_MOMENTUM = 0.9


def _task_and_outputs(num_classes: int) -> tuple[str, int]:
    from multiscale_dali.training.losses import num_outputs, resolve_task

    task = resolve_task(num_classes)
    return task, num_outputs(task, num_classes)


def make_trainer(*, model: str, num_classes: int, scales: Sequence[int], device: str,
                 memory_efficient: bool = False, micro_batch_batchnorm: bool = False,
                 seed: int = 0) -> MultiScaleTrainer:
    """A :class:`MultiScaleTrainer` as ``msdali train`` builds it: channels_last, AMP auto, SGD, and the
    multi-scale defaults of :class:`TrainConfig` (BatchNorm private to each scale, loss shares by area).

    ``micro_batch_batchnorm``: with ``memory_efficient``, the largest scale in chunks even for a model
    with BatchNorm (``--micro-batch-batchnorm``).
    """
    from multiscale_dali.training.run import resolve_amp
    from multiscale_dali.training.losses import ScaleConsistencyLoss
    from multiscale_dali.training.config import TrainConfig
    from multiscale_dali.training.run_setup import bare_network
    from multiscale_dali.training.trainer import MultiScaleTrainer, TrainerOptions

    task, outputs = _task_and_outputs(num_classes)
    torch_device = torch.device(device)
    defaults = TrainConfig(model=model, scales=tuple(scales))
    # Seeded initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = bare_network(defaults, num_outputs=outputs, pretrained=False)
    net = net.to(torch_device, memory_format=torch.channels_last)
    return MultiScaleTrainer(
        net,
        loss=ScaleConsistencyLoss(task=task, consistency_weight=BENCH_CONSISTENCY_WEIGHT,
                                  scale_weighting=defaults.scale_weighting),
        optimizer=torch.optim.SGD(net.parameters(), lr=BENCH_LR, momentum=BENCH_MOMENTUM),
        schedule=constant_schedule(scales),
        options=TrainerOptions(epochs=1, amp_dtype=resolve_amp("auto", torch_device),
                               memory_efficient=memory_efficient, micro_batch_batchnorm=micro_batch_batchnorm),
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
