"""Flags shared by several commands, and the table of ``msdali train`` flags (one per config field)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import click

from multiscale_dali.cli.params import SCALES
from multiscale_dali.constants import (
    AUTO_AUGMENT_POLICIES,
    BACKENDS,
    CONSISTENCY_TYPES,
    MODES,
    SCALE_NORMS,
    SCALE_WEIGHTINGS,
    SELECT_ON,
    TASKS,
    TEACHERS,
)
from multiscale_dali.training.config import (
    AMP_CHOICES,
    BAD_FILE_POLICIES,
    DEFAULT_DATASETS,
    LR_SCHEDULES,
    OPTIMIZERS,
    TrainConfig,
)

F = TypeVar("F", bound=Callable[..., Any])

# (flag, config field, click type, help). Every flag defaults to None = "not given", so a recipe's
# value survives unless the flag is on the command line.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", click.Path(file_okay=False), "ImageFolder root (class subfolders, optional train/val/test). Default: the embedded texture photos."),
    ("--default-dataset", "default_dataset", click.Choice(DEFAULT_DATASETS), "Which embedded dataset to use without --data."),
    ("--out", "out", click.Path(file_okay=False), "Run directory (metrics.jsonl, config.json, results.json, best.pt). Default: runs/<timestamp>."),
    ("--backend", "backend", click.Choice(BACKENDS), "Data pipeline: auto picks DALI when it imports."),
    ("--mode", "mode", click.Choice(MODES), "multiscale: all scales every step; progressive: one growing scale."),
    ("--scales", "scales", SCALES, "Comma-separated increasing scales. multiscale: all of them every step; progressive: a ramp from the first to the last (more than two: the ramp's steps)."),
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
    ("--scale-weighting", "scale_weighting", click.Choice(SCALE_WEIGHTINGS), "multiscale: each scale's share of the base loss, equal or by pixels (area: the top scale weighs most). [default: area]"),
    ("--scale-norm", "scale_norm", click.Choice(SCALE_NORMS), "multiscale: BatchNorm shared by the scales, or private to each (picked by input size). [default: private in multiscale mode, shared in progressive]"),
    ("--optimizer", "optimizer", click.Choice(OPTIMIZERS), "Optimizer."),
    ("--lr", "lr", float, "Peak learning rate."),
    ("--weight-decay", "weight_decay", float, "Weight decay (decoupled for AdamW)."),
    ("--momentum", "momentum", float, "SGD momentum (Nesterov)."),
    ("--lr-schedule", "lr_schedule", click.Choice(LR_SCHEDULES), "Learning-rate schedule (per step)."),
    ("--warmup-epochs", "warmup_epochs", float, "Linear warm-up length in epochs."),
    ("--amp", "amp", click.Choice(AMP_CHOICES), "Mixed precision; auto = bf16/fp16 on CUDA, off on CPU."),
    ("--channels-last/--no-channels-last", "channels_last", None, "channels_last memory format."),
    ("--memory-efficient/--no-memory-efficient", "memory_efficient", None, "Backward one scale at a time (lower peak memory); the largest scale in micro-batches when that is exact (no BatchNorm)."),
    ("--micro-batch-batchnorm/--no-micro-batch-batchnorm", "micro_batch_batchnorm", None, "With --memory-efficient: micro-batch the largest scale of a BatchNorm model too; BN then sees each chunk's statistics (ghost batch norm), so the gradients are no longer the naive step's."),
    ("--accum-steps", "accum_steps", int, "Gradient accumulation: loader batches per optimiser step (effective batch = batch size x this x processes); the learning-rate schedule counts optimiser steps."),
    ("--compile/--no-compile", "compile", None, "torch.compile the network for training (one static graph per scale; the first epoch pays the compile time)."),
    ("--sync-bn/--no-sync-bn", "sync_bn", None, "SyncBatchNorm: BatchNorm statistics over every rank's batch (needs CUDA devices under torchrun)."),
    ("--grad-clip", "grad_clip", float, "Clip gradient norm to this value (0 = off)."),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N."),
    ("--workers", "workers", int, "DALI threads / torchvision loader workers."),
    ("--seed", "seed", int, "Random seed (data order, crops, initialisation)."),
    ("--split-fractions", "split_fractions", str, "train,val,test fractions when --data has no train/val/test folders."),
    ("--checkpoint-every", "checkpoint_every", int, "Also checkpoint every N steps (0 = at epoch ends only)."),
    ("--on-bad-file", "on_bad_file", click.Choice(BAD_FILE_POLICIES), "Unreadable images found by the pre-flight scan: stop, or train without them."),
    ("--max-image-pixels", "max_image_pixels", int, "Reject images whose header claims more pixels (decompression bombs)."),
    ("--scan/--no-scan", "scan", None, "Pre-flight check of every image (cached per file); --no-scan trusts the data."),
    # The training recipe: one random draw per sample (or batch), shared by every scale of the step.
    ("--auto-augment", "auto_augment", click.Choice(AUTO_AUGMENT_POLICIES), "Automatic augmentation of the training crop, drawn once per sample for all scales: trivial (TrivialAugmentWide), rand (RandAugment), auto (AutoAugment, ImageNet policy)."),
    ("--rand-n", "rand_n", int, "--auto-augment rand: operations per sample."),
    ("--rand-m", "rand_m", int, "--auto-augment rand: magnitude bin, 0..30."),
    ("--random-erase", "random_erase", float, "Probability of erasing a random box of each training image (after normalisation; the same box at every scale)."),
    ("--mixup", "mixup", float, "MixUp alpha (0 = off): one lambda and one partner per batch for all scales."),
    ("--cutmix", "cutmix", float, "CutMix alpha (0 = off): one box per batch, in relative coordinates, scaled to every scale."),
    ("--mix-prob", "mix_prob", float, "Probability that a batch is mixed (timm's --mixup-prob)."),
    ("--mix-switch-prob", "mix_switch_prob", float, "With --mixup and --cutmix: probability of CutMix instead of MixUp for a batch."),
    ("--label-smoothing", "label_smoothing", float, "Training targets: 1 - eps on the label, eps spread over the classes (binary: towards 0.5). Evaluation loss stays plain."),
    ("--ema-decay", "ema_decay", float, "Weight EMA decay (0 = off), with a warm-up; validated beside the raw weights every epoch."),
    ("--select-on", "select_on", click.Choice(SELECT_ON), "With --ema-decay: the weights kept as best.pt (default ema)."),
]
TRAIN_FIELDS: tuple[str, ...] = tuple(field for _, field, _, _ in TRAIN_FLAGS)


def _default_text(field: str) -> str:
    value = getattr(TrainConfig(), field)
    if value is None or field == "out":
        return ""
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        value = "on" if value else "off"
    return f" [default: {value}]" if value != "" else ""


def train_options(func: F) -> F:
    """Every TRAIN_FLAGS flag, defaulting to None; --help shows TrainConfig's own defaults, so it cannot drift."""
    for flag, field, kind, help_text in reversed(TRAIN_FLAGS):
        help_text += _default_text(field)
        if kind is None:
            func = click.option(flag, default=None, help=help_text)(func)
        else:
            func = click.option(flag, type=kind, default=None, help=help_text)(func)
    return func


def checkpoint_option(func: F) -> F:
    return click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
                        help="A run's best.pt, or its checkpoints/last.pt.")(func)


def device_option(func: F) -> F:
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(func)
