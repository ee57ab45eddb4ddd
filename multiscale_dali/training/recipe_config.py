"""Checks of the training-recipe fields of :class:`~multiscale_dali.training.config.TrainConfig`.

The recipe is automatic augmentation (``auto_augment``, ``rand_n``, ``rand_m``), random erasing,
MixUp/CutMix (``mixup``, ``cutmix``, ``mix_prob``, ``mix_switch_prob``, timm's semantics), label
smoothing and a weight EMA (``ema_decay``, ``select_on``). Each check raises a ``ConfigError`` on the
field, which the command line shows as the flag (``--mix-prob``) with the allowed range. As elsewhere
in the configuration, a setting that would do nothing is refused rather than silently ignored: a
RandAugment knob without RandAugment, a mixing probability without MixUp or CutMix, a choice of
weights without an EMA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from multiscale_dali.constants import SELECT_ON, AutoAugmentPolicy, SelectOn
from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.augment_policy import check_auto_augment

if TYPE_CHECKING:
    from multiscale_dali.training.config import TrainConfig

# timm's and torchvision's defaults: RandAugment rand-m9-n2, Mixup(prob=1.0, switch_prob=0.5).
DEFAULT_RAND_N = 2
DEFAULT_RAND_M = 9
DEFAULT_MIX_PROB = 1.0
DEFAULT_MIX_SWITCH_PROB = 0.5


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_probability(key: str, value: float) -> None:
    if not _finite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"must be a probability in [0, 1], got {value!r}")


def _check_augment(config: "TrainConfig") -> None:
    check_auto_augment(config.auto_augment, config.rand_n, config.rand_m)
    if config.auto_augment != AutoAugmentPolicy.RAND:
        for key, default in (("rand_n", DEFAULT_RAND_N), ("rand_m", DEFAULT_RAND_M)):
            if getattr(config, key) != default:
                raise ConfigError(key, f"applies to --auto-augment rand only (it is {config.auto_augment!r})")
    _check_probability("random_erase", config.random_erase)


def _check_mixing(config: "TrainConfig") -> None:
    for key in ("mixup", "cutmix"):
        value = getattr(config, key)
        if not _finite(value) or value < 0:
            raise ConfigError(key, f"must be a Beta(alpha, alpha) parameter >= 0 (0 = off), got {value!r}")
    _check_probability("mix_prob", config.mix_prob)
    _check_probability("mix_switch_prob", config.mix_switch_prob)
    if config.mix_prob != DEFAULT_MIX_PROB and not (config.mixup > 0 or config.cutmix > 0):
        raise ConfigError("mix_prob", "applies when --mixup or --cutmix is > 0")
    if config.mix_switch_prob != DEFAULT_MIX_SWITCH_PROB and not (config.mixup > 0 and config.cutmix > 0):
        raise ConfigError("mix_switch_prob",
                          "picks CutMix over MixUp: it applies when both --mixup and --cutmix are > 0")
    if not _finite(config.label_smoothing) or not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError("label_smoothing", f"must be in [0, 1), got {config.label_smoothing!r}")


def _check_ema(config: "TrainConfig") -> None:
    if not _finite(config.ema_decay) or not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError("ema_decay",
                          f"must be 0 (no EMA) or a decay in (0, 1), e.g. 0.9998, got {config.ema_decay!r}")
    if config.select_on and config.select_on not in SELECT_ON:
        raise ConfigError("select_on", f"{config.select_on!r} is not one of {', '.join(SELECT_ON)}")
    if config.select_on and config.ema_decay == 0:
        raise ConfigError("select_on", "chooses between the EMA and the trained weights: it needs --ema-decay > 0")


def check_recipe_fields(config: "TrainConfig") -> None:
    """Raise ``ConfigError`` on the first recipe field out of its range or without effect."""
    _check_augment(config)
    _check_mixing(config)
    _check_ema(config)


def selects_ema(config: "TrainConfig") -> bool:
    """Whether ``best.pt`` holds the EMA's weights: with an EMA, unless ``--select-on raw``."""
    return config.ema_decay > 0 and config.select_on != SelectOn.RAW
