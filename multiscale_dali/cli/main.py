"""``msdali`` command line: parse flags, call library code, print results. Nothing else lives here."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import click

from multiscale_dali.training.config import (
    AMP_CHOICES,
    BAD_FILE_POLICIES,
    DEFAULT_DATASETS,
    LR_SCHEDULES,
    OPTIMIZERS,
    ConfigError,
    TrainConfig,
    bundled_recipes,
    config_from_mapping,
    load_recipe,
    recipe_config,
)
from multiscale_dali.constants import BACKENDS, CONSISTENCY_TYPES, EXIT_INTERRUPTED, MODES, TASKS, TEACHERS

def _scales(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError("scales", f"{value!r} is not a comma-separated list of integers, e.g. 64,96,128") from None


# (flag, config field, click type, help). Every flag defaults to None = "not given", so a recipe's
# value survives unless the flag is on the command line.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", click.Path(file_okay=False), "ImageFolder root (class subfolders, optional train/val/test). Default: the embedded texture photos."),
    ("--default-dataset", "default_dataset", click.Choice(DEFAULT_DATASETS), "Which embedded dataset to use without --data."),
    ("--out", "out", click.Path(file_okay=False), "Run directory (metrics.jsonl, config.json, results.json, best.pt). Default: runs/<timestamp>."),
    ("--backend", "backend", click.Choice(BACKENDS), "Data pipeline: auto picks DALI when it imports."),
    ("--mode", "mode", click.Choice(MODES), "multiscale: all scales every step; progressive: one growing scale."),
    ("--scales", "scales", str, "Comma-separated increasing scales. multiscale: all of them every step; progressive: a ramp from the first to the last (more than two: the ramp's steps)."),
    ("--schedule", "schedule", str, "progressive only: explicit EPOCH:SCALE steps, e.g. 0:64,3:96,6:128 (replaces the ramp)."),
    ("--ramp-multiple", "ramp_multiple", int, "progressive ramp between two scales: intermediate scales snap to this multiple."),
    ("--epochs", "epochs", int, "Number of epochs."),
    ("--batch-size", "batch_size", int, "Batch size per process."),
    ("--model", "model", str, "Model name (see `msdali models`)."),
    ("--pretrained/--no-pretrained", "pretrained", None, "Start from cached torchvision weights (never downloaded)."),
    ("--task", "task", click.Choice(TASKS), "binary (one logit, BCE) or multiclass (CE); auto: binary for 2 classes."),
    ("--consistency-weight", "consistency_weight", float, "multiscale only: weight of the scale-consistency loss (0 = off)."),
    ("--consistency-type", "consistency_type", click.Choice(CONSISTENCY_TYPES), "Divergence between scales."),
    ("--teacher", "teacher", click.Choice(TEACHERS), "Consistency target: largest scale or ensemble mean."),
    ("--optimizer", "optimizer", click.Choice(OPTIMIZERS), "Optimizer."),
    ("--lr", "lr", float, "Peak learning rate."),
    ("--weight-decay", "weight_decay", float, "Weight decay (decoupled for AdamW)."),
    ("--momentum", "momentum", float, "SGD momentum (Nesterov)."),
    ("--lr-schedule", "lr_schedule", click.Choice(LR_SCHEDULES), "Learning-rate schedule (per step)."),
    ("--warmup-epochs", "warmup_epochs", float, "Linear warm-up length in epochs."),
    ("--amp", "amp", click.Choice(AMP_CHOICES), "Mixed precision; auto = bf16/fp16 on CUDA, off on CPU."),
    ("--channels-last/--no-channels-last", "channels_last", None, "channels_last memory format."),
    ("--memory-efficient/--no-memory-efficient", "memory_efficient", None, "Backward one scale at a time (lower peak memory)."),
    ("--grad-clip", "grad_clip", float, "Clip gradient norm to this value (0 = off)."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N."),
    ("--workers", "workers", int, "DALI threads / torchvision loader workers."),
    ("--seed", "seed", int, "Random seed (data order, crops, initialisation)."),
    ("--split-fractions", "split_fractions", str, "train,val,test fractions when --data has no train/val/test folders."),
    ("--checkpoint-every", "checkpoint_every", int, "Also checkpoint every N steps (0 = at epoch ends only)."),
    ("--on-bad-file", "on_bad_file", click.Choice(BAD_FILE_POLICIES), "Unreadable images found by the pre-flight scan: stop, or train without them."),
    ("--max-image-pixels", "max_image_pixels", int, "Reject images whose header claims more pixels (decompression bombs)."),
    ("--scan/--no-scan", "scan", None, "Pre-flight check of every image (cached per file); --no-scan trusts the data."),
]


def _default_text(field: str) -> str:
    value = getattr(TrainConfig(), field)
    if value is None or field == "out":
        return ""
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        value = "on" if value else "off"
    return f" [default: {value}]" if value != "" else ""


def _train_options(func):
    # Defaults are shown from TrainConfig itself, so --help can never drift from the real values.
    for flag, field, kind, help_text in reversed(TRAIN_FLAGS):
        help_text += _default_text(field)
        if kind is None:
            func = click.option(flag, default=None, help=help_text)(func)
        else:
            func = click.option(flag, type=kind, default=None, help=help_text)(func)
    return func


def build_train_config(
    config_path: str | None, flags: dict[str, Any], *, resumed: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults < recipe < flags. Resuming without a recipe starts from the checkpoint's configuration;
    with one (a relaunch script that always passes the same --config), the recipe and flags must agree
    with the checkpoint, which the run checks.

    Raises click.UsageError naming the flag (or recipe key).
    """
    given: dict[str, Any] = {}
    try:
        if config_path:
            base = recipe_config(config_path)
        elif resumed is not None:
            base = config_from_mapping(resumed, source="the checkpoint")
        else:
            base = TrainConfig()
        given = {field: flags[field] for _, field, _, _ in TRAIN_FLAGS if flags.get(field) is not None}
        # Comma-separated flags (--scales, --split-fractions) are split and typed by the config itself.
        if "out" not in given:
            if resumed is not None:
                given["out"] = resumed["out"]
            elif config_path is None or base.out == TrainConfig().out:
                given["out"] = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
        return config_from_mapping(given, base=base, source="command line")
    except ConfigError as err:
        origin = ""
        if err.key not in given and config_path:
            origin = f" (the value comes from {config_path}; override it on the command line)"
        raise click.UsageError(f"{err.flag}: {err.message}{origin}") from None


def _resumed_config(resume: str | None, out: str | None) -> dict[str, Any] | None:
    """The configuration stored in the checkpoint a resume will use (None: fresh run)."""
    from multiscale_dali.training.checkpoint import CheckpointError
    from multiscale_dali.training.resume import find_resume_checkpoint, run_dir_of

    if resume is None:
        return None
    if resume == "auto" and out is None:
        raise click.UsageError("--resume auto: give the run directory to continue with --out")
    try:
        found = find_resume_checkpoint(resume, Path(out or "."))
    except CheckpointError as err:
        raise click.UsageError(f"--resume: {err}") from None
    if found is None:
        return None
    # Without --out, a checkpoint file continues in its own run directory, wherever it was moved.
    return found[1]["config"] | {"out": str(run_dir_of(found[0]))}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into one-line usage errors (exit 2) that name the flag."""
    from multiscale_dali.data.discovery import DataError
    from multiscale_dali.models.registry import ModelError

    from multiscale_dali.training.run_directory import RunDirectoryError
    from multiscale_dali.training.checkpoint import CheckpointError
    from multiscale_dali.training.distributed import DistributedError
    from multiscale_dali.data.scan import BadImagesError
    from multiscale_dali.training.trainer import NonFiniteLossError

    try:
        yield
    except RunDirectoryError as err:
        raise click.UsageError(f"--out: {err}") from None
    except CheckpointError as err:
        raise click.UsageError(f"--resume: {err}") from None
    except (NonFiniteLossError, DistributedError) as err:
        raise click.ClickException(str(err)) from None
    except BadImagesError as err:
        raise click.ClickException(f"{err}\nOr train without them: --on-bad-file skip.") from None
    except DataError as err:
        raise click.UsageError(f"--data: {err}") from None
    except ModelError as err:
        raise click.UsageError(f"--model: {err}") from None
    except ConfigError as err:
        raise click.UsageError(f"{err.flag}: {err.message}") from None


def _format_epoch(record, epochs: int) -> str:
    train = " ".join(f"{s}px {m['loss']:.3f}/{m['accuracy']:.1%}" for s, m in record.train.items())
    val = " ".join(f"{s}px {m['loss']:.3f}/{m['accuracy']:.1%}" for s, m in record.val.items())
    best = " *" if record.is_best else ""
    return (f"epoch {record.epoch + 1:>3}/{epochs} | train loss/acc {train} | val {val or '-'} | "
            f"{record.images_per_second:,.0f} img/s {record.seconds:.1f}s{best}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Multi-scale image classification with decode-once GPU data pipelines (DALI or torchvision)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe: a bundled name (see `msdali recipes`) or a TOML file; flags override its values.")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue a run: auto = the checkpoint in --out (fresh start if none), or a checkpoint file.")
@click.option("--plot", "plot_at_end", is_flag=True, help="Write PNG figures to RUN_DIR/plots at the end (needs the plot extra).")
@click.option("--tensorboard", is_flag=True, help="Also log per-epoch metrics to RUN_DIR/tensorboard (needs the tensorboard extra).")
@_train_options
def train(config_path: str | None, resume: str | None, plot_at_end: bool, tensorboard: bool, **flags: Any) -> None:
    """Train a classifier; writes metrics.jsonl, config.json, results.json and best.pt to --out.

    SIGTERM/SIGINT stop at the next step with a checkpoint and exit code 75; --resume auto continues.
    """
    from multiscale_dali.training.run import run_training

    resumed = _resumed_config(resume, flags.get("out"))
    config = build_train_config(config_path, flags, resumed=resumed)
    # Under torchrun every rank runs this command; only rank 0 talks (and writes, see app.py).
    echo = click.echo if os.environ.get("RANK", "0") == "0" else (lambda *_a, **_k: None)
    echo(f"run directory: {config.out}")
    with user_errors(), _train_reporter(config, tensorboard=tensorboard, plot=plot_at_end) as reporter:
        result = run_training(config, resume=resume, on_epoch_end=reporter.epoch_end, on_step=reporter.step)
    if result.interrupted:
        echo(f"stopped by {result.stop_signal}; checkpoint saved. Continue with: "
             f"msdali train --out {config.out} --resume auto")
        sys.exit(EXIT_INTERRUPTED)
    best = None if result.best_epoch is None else result.best_epoch + 1
    echo(f"backend {result.backend} on {result.device}; best epoch {best}")
    for scale, metrics in result.test.items():
        echo(f"test {scale}px: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.1%}")
    if plot_at_end and result.rank == 0:
        for path in _write_plots(config.out):
            echo(f"wrote {path}")
    echo(f"next: msdali evaluate --checkpoint {config.out}/best.pt --recalibrate-bn   |   msdali plot {config.out}")


@main.command()
def models() -> None:
    """List the available models."""
    from multiscale_dali.models.registry import describe_models

    for name, description in describe_models():
        click.echo(f"{name:<22} {description}")


@main.command()
def recipes() -> None:
    """List the bundled TOML recipes (the project's pipelines/); use one with --config NAME."""
    for name, path in bundled_recipes().items():
        try:
            _, description = load_recipe(path)
        except ConfigError as err:
            description = f"(invalid: {err.message})"
        click.echo(f"{name:<28} {description}")


@main.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Folder to scan (every file under it). Default: the embedded texture photos.")
@click.option("--max-image-pixels", type=int, default=None, help="Decompression-bomb cap, from the header.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None, help="Also write the full report as JSON here.")
def scan(data: str | None, max_image_pixels: int | None, manifest: str | None) -> None:
    """Check every file by content before training: what is bad, what will be converted.

    Exit code 1 when a bad image is found. Results are cached per file (size, mtime), so a
    second scan of unchanged files decodes nothing; `msdali train` runs the same scan.
    """
    from multiscale_dali.training.run import dataset_root, scan_cache_path
    from multiscale_dali.reporting.progress import CountProgress
    from multiscale_dali.data.scan import DEFAULT_MAX_PIXELS, scan_tree

    root = Path(data) if data else dataset_root(TrainConfig())
    if not root.is_dir():
        raise click.UsageError(f"--data: {root} is not a directory")
    with CountProgress(desc="scan", unit="file", enabled=_bars_enabled()) as progress:
        result = scan_tree(root, max_pixels=max_image_pixels or DEFAULT_MAX_PIXELS, cache_path=scan_cache_path(root),
                           on_progress=progress)
    for report in result.bad:
        click.echo(f"BAD       {report.path}: {report.reason}")
    for report in result.converted:
        click.echo(f"converted {report.path}: {report.note}")
    for report in result.ignored:
        click.echo(f"ignored   {report.path}: {report.reason}")
    for folder in result.empty_dirs:
        click.echo(f"empty     {folder}")
    if manifest:
        from multiscale_dali.fileio import atomic_write_text

        atomic_write_text(manifest, result.to_json())
    counts = result.counts()
    click.echo(", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" ({result.cached_count} from cache)")
    if result.bad:
        sys.exit(1)


def _worker_counts(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError("workers", f"{value!r} is not a comma-separated list of worker counts, e.g. 0,2,4") from None


# ---------------------------------------------------------------------------------------- the user's side
def _bars_enabled() -> bool | None:
    """-q asks for warnings only: no progress bars either. Otherwise (None) tqdm shows them on a terminal only."""
    return False if logging.getLogger().getEffectiveLevel() > logging.INFO else None


class _TrainReporter:
    """What `msdali train` shows per step and per epoch: progress bar, epoch line, TensorBoard scalars."""

    def __init__(self, *, epochs: int, out: str, tensorboard: bool) -> None:
        from multiscale_dali.reporting.progress import EpochProgress

        self.epochs = epochs
        self.out = out
        self.progress = EpochProgress(epochs=epochs, stream=sys.stderr, enabled=_bars_enabled())
        self.tensorboard = tensorboard
        self._writer = None

    def step(self, event) -> None:
        self.progress.on_step(event)

    def epoch_end(self, record) -> None:
        self.progress.close()  # the bar leaves its line before the epoch's summary is printed
        click.echo(_format_epoch(record, self.epochs))
        if self.tensorboard:
            if self._writer is None:  # created at the first epoch: a run refused at start leaves no folder
                from multiscale_dali.reporting.tensorboard import TensorBoardLogger

                self._writer = TensorBoardLogger(self.out)
            self._writer.log_epoch(record)

    def close(self) -> None:
        self.progress.close()
        if self._writer is not None:
            self._writer.close()


@contextmanager
def _train_reporter(config: TrainConfig, *, tensorboard: bool, plot: bool) -> Iterator[_TrainReporter]:
    """Check the optional extras before training (not after an hour of it), then report the run."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from multiscale_dali.extras import MissingExtraError

    try:
        if tensorboard:
            from multiscale_dali.reporting.tensorboard import summary_writer_class

            summary_writer_class()
        if plot:
            from multiscale_dali.reporting.plot import check_plotting_available

            check_plotting_available()
    except MissingExtraError as err:
        raise click.UsageError(f"{'--tensorboard' if err.extra == 'tensorboard' else '--plot'}: {err}") from None
    reporter = _TrainReporter(epochs=config.epochs, out=config.out, tensorboard=tensorboard)
    try:
        with logging_redirect_tqdm():  # log lines go above the bar instead of through it
            yield reporter
    finally:
        reporter.close()


def _write_plots(run_dir: str | Path, *, out_dir: str | None = None) -> list[Path]:
    from multiscale_dali.extras import MissingExtraError
    from multiscale_dali.reporting.plot import PlotError, plot_run

    try:
        return plot_run(run_dir, out_dir=out_dir)
    except (MissingExtraError, PlotError) as err:
        raise click.ClickException(str(err)) from None


def _checkpoint_option(func):
    return click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
                        help="A run's best.pt, or its checkpoints/last.pt.")(func)


@main.command()
@_checkpoint_option
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="ImageFolder root. Default: the dataset the run trained on (split the same way).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Which split to measure.")
@click.option("--scales", "scales_text", default=None,
              help="Comma-separated resolutions, e.g. 96,128,160,192. Default: the run's training scales.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Data pipeline.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Evaluation batch size.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=2, show_default=True, help="DALI threads / loader workers.")
@click.option("--recalibrate-bn", is_flag=True,
              help="Also measure each resolution with BatchNorm statistics re-estimated there from train images.")
@click.option("--bn-batches", type=int, default=50, show_default=True,
              help="Train batches (at most) that re-estimate the BatchNorm statistics.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the results. Default: eval.json in the run directory.")
def evaluate(checkpoint: str, data: str | None, split: str, scales_text: str | None, backend: str,
             batch_size: int, device: str, workers: int, recalibrate_bn: bool, bn_batches: int,
             json_path: str | None) -> None:
    """Accuracy, loss (and AUC for binary tasks) of a checkpoint at several resolutions, plus their ensemble."""
    import json

    from multiscale_dali.evaluation.evaluate import EvalOptions, default_eval_path, evaluate_checkpoint, format_report

    with user_errors():
        options = EvalOptions(
            scales=_scales(scales_text) if scales_text else None, split=split, data=data, backend=backend,
            device=device, batch_size=batch_size, workers=workers, recalibrate_bn=recalibrate_bn,
            bn_batches=bn_batches,
        )
        report = evaluate_checkpoint(checkpoint, options=options)
    epoch = "" if report.epoch is None else f" (epoch {report.epoch + 1})"
    click.echo(f"{report.checkpoint}{epoch}: {report.split} split, {report.num_samples} images, {report.task}; "
               f"backend {report.backend} on {report.device}")
    for line in format_report(report):
        click.echo(line)
    from multiscale_dali.fileio import atomic_write_text

    out = Path(json_path) if json_path else default_eval_path(checkpoint)
    atomic_write_text(out, json.dumps(report.to_json(), indent=2) + "\n")
    click.echo(f"wrote {out}")


@main.command()
@_checkpoint_option
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--scale", type=int, default=None,
              help="One resolution. Default: the largest scale the model was trained at last.")
@click.option("--scales", "scales_text", default=None,
              help="Several resolutions, e.g. 64,96,128: the mean of their probabilities.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def predict(checkpoint: str, images: tuple[str, ...], scale: int | None, scales_text: str | None,
            device: str) -> None:
    """Class and probability of each image (tab-separated: path, class, probability)."""
    from multiscale_dali.training.distributed import resolve_device
    from multiscale_dali.evaluation.evaluate import ImageError, default_predict_scales, load_model, predict_images

    if scale is not None and scales_text:
        raise click.UsageError("--scale and --scales: give one of them")
    with user_errors():
        loaded = load_model(checkpoint, device=resolve_device(device))
        scales = (scale,) if scale is not None else (_scales(scales_text) if scales_text
                                                    else default_predict_scales(loaded))
        try:
            predictions = predict_images(loaded, list(images), scales=scales)
        except ImageError as err:
            raise click.ClickException(str(err)) from None
    for prediction in predictions:
        click.echo(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the PNGs. Default: RUN_DIR/plots.")
def plot(run_dir: str, out_dir: str | None) -> None:
    """PNG figures of a run: loss/accuracy per scale, the scale schedule, the evaluation sweep (eval.json)."""
    for path in _write_plots(run_dir, out_dir=out_dir):
        click.echo(f"wrote {path}")



@main.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="ImageFolder to read (its train/ split if it has one). Default: the embedded texture photos.")
@click.option("--synthetic", type=click.IntRange(min=1), default=None,
              help="Use N generated photo-like 500x375 JPEGs (cached) instead of --data.")
@click.option("--scales", default="64,96,128", show_default=True, help="Comma-separated increasing scales.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size.")
@click.option("--backends", default="dali,torchvision,baseline", show_default=True,
              help="Comma-separated from dali, torchvision, baseline, dali-1scale (dali brings dali-1scale).")
@click.option("--model", default="tiny_cnn", show_default=True,
              help="Model of the training-step and memory sections (see `msdali models`); 'none' skips them.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed batches per trial.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed batches after the first one.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds, each a fresh loader per case; the median is reported with min and max.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None,
              help="DataLoader worker counts to sweep, e.g. 0,1,2. Default: 0..2 on CPU, powers of two up to the cores on GPU.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full results (with the machine description) as JSON to this file.")
def benchmark(data: Path | None, synthetic: int | None, scales: str, batch_size: int, backends: str, model: str,
              iters: int, warmup: int, repeats: int, device: str, workers: str | None, json_out: Path | None) -> None:
    """Loader and training throughput of every backend side by side, step memory, and the goals.

    See docs/benchmarks.md for what each number means and the figures we measured.
    """
    from multiscale_dali.benchmark.core import format_report, run_benchmark, save_results

    if data is not None and synthetic is not None:
        raise click.UsageError("--data and --synthetic are mutually exclusive")
    try:
        with user_errors():
            results = run_benchmark(
                data=data, scales=_scales(scales), batch_size=batch_size,
                backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
                model=None if model.lower() == "none" else model, iters=iters, device=device,
                workers=_worker_counts(workers) if workers else None, warmup=warmup, repeats=repeats,
                synthetic=synthetic,
            )
    except ConfigError as err:
        raise click.UsageError(f"{err.flag}: {err.message}") from None
    except ValueError as err:  # argument checks of run_benchmark (backend names, scales, counts)
        raise click.UsageError(str(err)) from None
    click.echo(format_report(results))
    if json_out is not None:
        save_results(results, json_out)
        click.echo(f"results written to {json_out}")
