"""The one check of an automatic-augmentation choice, without torch: the configuration validates a
recipe with it when it is read, and :class:`~multiscale_dali.pipelines.augment.AutoAugmentSpec` when
a loader is built, so both refuse the same values with the same words."""

from __future__ import annotations

from multiscale_dali.constants import AUTO_AUGMENT_POLICIES, MAX_RAND_M
from multiscale_dali.errors import ConfigError


def check_auto_augment(policy: str, rand_n: int, rand_m: int) -> None:
    """A ``ConfigError`` on ``auto_augment``, ``rand_n`` or ``rand_m`` (the flags' fields) naming the range."""
    if policy not in AUTO_AUGMENT_POLICIES:
        raise ConfigError("auto_augment", f"{policy!r} is not one of {', '.join(AUTO_AUGMENT_POLICIES)}")
    if isinstance(rand_n, bool) or not isinstance(rand_n, int) or rand_n < 1:
        raise ConfigError("rand_n", f"must be an integer >= 1 (operations per sample), got {rand_n!r}")
    if isinstance(rand_m, bool) or not isinstance(rand_m, int) or not 0 <= rand_m <= MAX_RAND_M:
        raise ConfigError("rand_m", f"must be an integer magnitude bin in 0..{MAX_RAND_M}, got {rand_m!r}")
