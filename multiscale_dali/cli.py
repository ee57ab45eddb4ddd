"""``msdali`` command line: parse flags, call library code, print results. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import click

from multiscale_dali.config import ConfigError, TrainConfig, config_from_mapping, load_recipe, recipe_config
from multiscale_dali.constants import BACKENDS, CONSISTENCY_TYPES, MODES, TASKS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "pipelines"


def _scales(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 64,96,128") from None


# (flag, config field, click type, help). Every flag defaults to None = "not given", so a recipe's
# value survives unless the flag is on the command line.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", click.Path(file_okay=False), "ImageFolder root (class subfolders, optional train/val/test). Default: the embedded texture photos."),
    ("--default-dataset", "default_dataset", click.Choice(["textures", "textures-binary"]), "Which embedded dataset to use without --data."),
    ("--out", "out", click.Path(file_okay=False), "Run directory (metrics.jsonl, config.json, results.json, best.pt). Default: runs/<timestamp>."),
    ("--backend", "backend", click.Choice(BACKENDS), "Data pipeline: auto picks DALI when it imports."),
    ("--mode", "mode", click.Choice(MODES), "multiscale: all scales every step; progressive: one growing scale."),
    ("--scales", "scales", str, "Comma-separated increasing scales, e.g. 64,96,128 (progressive: ramp from first to last)."),
    ("--schedule", "schedule", str, "Progressive steps EPOCH:SCALE,..., e.g. 0:64,3:96,6:128."),
    ("--ramp-multiple", "ramp_multiple", int, "Progressive ramp scales snap to this multiple."),
    ("--epochs", "epochs", int, "Number of epochs."),
    ("--batch-size", "batch_size", int, "Batch size per process."),
    ("--model", "model", str, "Model name (see `msdali models`)."),
    ("--pretrained/--no-pretrained", "pretrained", None, "Start from cached torchvision weights (never downloaded)."),
    ("--task", "task", click.Choice(TASKS), "binary (one logit, BCE) or multiclass (CE); auto: binary for 2 classes."),
    ("--consistency-weight", "consistency_weight", float, "Weight of the scale-consistency loss (0 = off)."),
    ("--consistency-type", "consistency_type", click.Choice(CONSISTENCY_TYPES), "Divergence between scales."),
    ("--teacher", "teacher", click.Choice(["largest", "mean"]), "Consistency target: largest scale or ensemble mean."),
    ("--optimizer", "optimizer", click.Choice(["adamw", "sgd"]), "Optimizer."),
    ("--lr", "lr", float, "Peak learning rate."),
    ("--weight-decay", "weight_decay", float, "Weight decay."),
    ("--lr-schedule", "lr_schedule", click.Choice(["cosine", "constant"]), "Learning-rate schedule (per step)."),
    ("--warmup-epochs", "warmup_epochs", float, "Linear warm-up length in epochs."),
    ("--amp", "amp", click.Choice(["auto", "off", "bf16", "fp16"]), "Mixed precision; auto = bf16/fp16 on CUDA, off on CPU."),
    ("--channels-last/--no-channels-last", "channels_last", None, "channels_last memory format."),
    ("--memory-efficient/--no-memory-efficient", "memory_efficient", None, "Backward one scale at a time (lower peak memory)."),
    ("--grad-clip", "grad_clip", float, "Clip gradient norm to this value (0 = off)."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N."),
    ("--workers", "workers", int, "DALI threads / torchvision loader workers."),
    ("--seed", "seed", int, "Random seed (data order, crops, initialisation)."),
]


def _train_options(func):
    for flag, _, kind, help_text in reversed(TRAIN_FLAGS):
        if kind is None:
            func = click.option(flag, default=None, help=help_text)(func)
        else:
            func = click.option(flag, type=kind, default=None, help=help_text)(func)
    return func


def build_train_config(config_path: str | None, flags: dict[str, Any]) -> TrainConfig:
    """defaults < recipe < flags. Raises click.UsageError naming the flag (or recipe key)."""
    try:
        base = recipe_config(config_path) if config_path else TrainConfig()
        given = {field: flags[field] for _, field, _, _ in TRAIN_FLAGS if flags.get(field) is not None}
        if "scales" in given:
            given["scales"] = _scales(given["scales"])
        if "out" not in given and (config_path is None or base.out == TrainConfig().out):
            given["out"] = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
        return config_from_mapping(given, base=base, source="command line")
    except ConfigError as err:
        raise click.UsageError(f"{err.flag}: {err.message}") from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into one-line usage errors (exit 2) that name the flag."""
    from multiscale_dali.data import DataError
    from multiscale_dali.models import ModelError

    try:
        yield
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
              help="TOML recipe (see `msdali recipes`); flags override its values.")
@_train_options
def train(config_path: str | None, **flags: Any) -> None:
    """Train a classifier; writes metrics.jsonl, config.json, results.json and best.pt to --out."""
    from multiscale_dali.app import run_training

    config = build_train_config(config_path, flags)
    click.echo(f"run directory: {config.out}")
    with user_errors():
        result = run_training(config, on_epoch_end=lambda r: click.echo(_format_epoch(r, config.epochs)))
    click.echo(f"backend {result.backend} on {result.device}; best epoch {None if result.best_epoch is None else result.best_epoch + 1}")
    for scale, metrics in result.test.items():
        click.echo(f"test {scale}px: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.1%}")


@main.command()
def models() -> None:
    """List the available models."""
    from multiscale_dali.models import describe_models

    for name, description in describe_models():
        click.echo(f"{name:<22} {description}")


@main.command()
def recipes() -> None:
    """List the TOML recipes shipped in pipelines/."""
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        try:
            _, description = load_recipe(path)
        except ConfigError as err:
            description = f"(invalid: {err.message})"
        click.echo(f"{str(path.relative_to(RECIPES_DIR.parent)):<44} {description}")


if __name__ == "__main__":  # `python -m multiscale_dali.cli` and `torchrun -m multiscale_dali.cli`
    main()
