"""The objects a run is built from, each a function of the configuration: precision, scale schedule,
seeds, network, optimizer, learning-rate schedule and trainer."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
from torch import nn

from multiscale_dali.errors import ConfigError
from multiscale_dali.models.registry import build_model
from multiscale_dali.models.scale_norm import private_scale_norm
from multiscale_dali.pipelines.schedule import (
    ScaleSchedule,
    constant_schedule,
    linear_ramp_schedule,
    parse_steps,
    stepwise_schedule,
)
from multiscale_dali.training.accumulate import optimizer_steps_per_epoch
from multiscale_dali.training.compiled import INDUCTOR
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.losses import ScaleConsistencyLoss, num_outputs
from multiscale_dali.training.mixing import MixConfig
from multiscale_dali.training.recipe import RecipeOptions, StepRecipe
from multiscale_dali.training.recipe_config import selects_ema
from multiscale_dali.training.trainer import MultiScaleTrainer, ProgressiveMultiScaleTrainer, TrainerOptions

log = logging.getLogger(__name__)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, off on CPU (slow there)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def build_schedule(config: TrainConfig) -> ScaleSchedule:
    if config.mode == "multiscale":
        return constant_schedule(config.scales)
    try:
        if config.schedule:
            return stepwise_schedule(parse_steps(config.schedule))
        # Two scales: a ramp snapped to --ramp-multiple; more: the listed scales are the ramp's steps.
        return linear_ramp_schedule(
            min_scale=config.scales[0], max_scale=config.scales[-1], epochs=config.epochs,
            multiple=config.ramp_multiple, levels=config.scales if len(config.scales) > 2 else None,
        )
    except ValueError as err:
        raise ConfigError("schedule", str(err)) from None


def warn_unvisited_scales(config: TrainConfig, schedule: ScaleSchedule) -> None:
    """Say which scales the run never trains at: --schedule steps at or after --epochs (they run only
    if the run is resumed with more epochs), or listed --scales a short progressive ramp skips."""
    if config.mode != "progressive":
        return
    late = [(start, scales) for start, scales in schedule.stages if start >= config.epochs]
    if late:
        log.warning("--schedule: step(s) %s start after the last epoch (--epochs %d runs epochs 0-%d); they run "
                    "only if the run is resumed with more --epochs", ", ".join(f"{e}:{s[0]}" for e, s in late),
                    config.epochs, config.epochs - 1)
    if config.schedule:
        return
    visited = {scale for scales in schedule.describe(config.epochs) for scale in scales}
    skipped = [scale for scale in config.scales if scale not in visited]
    if skipped:
        log.warning("--scales %s: the progressive ramp over %d epoch(s) never trains at %s; give more --epochs, "
                    "or an explicit --schedule", ",".join(map(str, config.scales)), config.epochs,
                    ", ".join(f"{s} px" for s in skipped))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bare_network(config: TrainConfig, *, num_outputs: int, pretrained: bool) -> nn.Module:
    """``config.model`` with ``num_outputs`` outputs, its BatchNorm private to each scale when the
    configuration says so: the network a run trains and a checkpoint's weights load into."""
    model = build_model(config.model, num_outputs=num_outputs, pretrained=pretrained)
    return private_scale_norm(model, config.scales) if config.private_scale_norm else model


def build_network(config: TrainConfig, *, task: str, num_classes: int, device: torch.device) -> nn.Module:
    """The configured model with the task's head, on ``device`` in the configured memory format."""
    model = bare_network(config, num_outputs=num_outputs(task, num_classes), pretrained=config.pretrained)
    return model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def build_lr_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, *, start_step: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step linear warm-up then cosine (or constant); a pure function of the step count.

    ``start_step`` > 0 rebuilds the schedule at that step of a resumed run (the optimizer's groups
    then carry ``initial_lr`` from the original scheduler).
    """
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def build_step_recipe(config: TrainConfig, model: nn.Module, *, task: str, num_classes: int, rank: int) -> StepRecipe:
    """Random erasing, MixUp/CutMix, label smoothing and the weight EMA of ``config`` (this rank's draws)."""
    mix = MixConfig(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mix_prob,
                    switch_prob=config.mix_switch_prob, label_smoothing=config.label_smoothing)
    options = RecipeOptions(mix=mix, random_erase=config.random_erase, ema_decay=config.ema_decay,
                            select_ema=selects_ema(config))
    return StepRecipe(options, model=model, task=task, num_classes=num_classes, seed=config.seed, rank=rank)


def build_trainer(
    config: TrainConfig,
    model: nn.Module,
    *,
    task: str,
    schedule: ScaleSchedule,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    context: DistributedContext,
    num_classes: int,
) -> MultiScaleTrainer:
    """The trainer of ``config.mode``, with its loss, options, learning-rate schedule and recipe.

    ``steps_per_epoch``: the loader's batches per epoch (micro-batches under ``accum_steps``).
    """
    trainer_cls = ProgressiveMultiScaleTrainer if config.mode == "progressive" else MultiScaleTrainer
    return trainer_cls(
        model,
        loss=ScaleConsistencyLoss(task=task, consistency_weight=config.consistency_weight,
                                  consistency_type=config.consistency_type, teacher=config.teacher,
                                  scale_weighting=config.scale_weighting),
        optimizer=optimizer,
        schedule=schedule,
        options=TrainerOptions(epochs=config.epochs, amp_dtype=resolve_amp(config.amp, context.device),
                               grad_clip_norm=config.grad_clip or None, memory_efficient=config.memory_efficient,
                               micro_batch_batchnorm=config.micro_batch_batchnorm, accum_steps=config.accum_steps,
                               compile_backend=INDUCTOR if config.compile else None, sync_batchnorm=config.sync_bn),
        # The schedule counts optimiser steps: with accumulation, fewer than the loader's batches.
        lr_scheduler=build_lr_scheduler(config, optimizer, optimizer_steps_per_epoch(steps_per_epoch,
                                                                                     config.accum_steps)),
        device=context.device,
        distributed=context,
        recipe=build_step_recipe(config, model, task=task, num_classes=num_classes, rank=context.rank),
    )
