"""Run configuration: one frozen dataclass, validated when built, loadable from TOML recipes.

Precedence is defaults < recipe (``--config pipelines/X.toml``) < command-line flags. Keys are the
field names below; an unknown key is an error that names it and the file, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from multiscale_dali.errors import ConfigError
from multiscale_dali.constants import (
    BACKENDS,
    CONSISTENCY_TYPES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_SCALES,
    DEFAULT_SPLIT_FRACTIONS,
    DEVICE_PATTERN,
    MODES,
    SCALE_NORMS,
    SCALE_WEIGHTINGS,
    TASKS,
    TEACHERS,
    Mode,
    ScaleNorm,
    ScaleWeighting,
)
from multiscale_dali.data.discovery import validate_fractions
from multiscale_dali.pipelines.schedule import parse_scales
from multiscale_dali.training.recipe_config import (
    DEFAULT_MIX_PROB,
    DEFAULT_MIX_SWITCH_PROB,
    DEFAULT_RAND_M,
    DEFAULT_RAND_N,
    check_recipe_fields,
)

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
DEFAULT_DATASETS = ("textures", "textures-binary")
BAD_FILE_POLICIES = ("error", "skip")
# What may differ between a checkpoint's configuration and the resuming run's.
# AMP may change too (a GPU run resumed on a CPU box): the GradScaler state is handled both ways.
RESUME_MUTABLE_KEYS = frozenset({"epochs", "out", "workers", "checkpoint_every", "device", "on_bad_file", "amp",
                                 "scan", "compile"})


def check_scales(scales: str | Sequence[int]) -> tuple[int, ...]:
    """Positive, strictly increasing scales (the schedule's own rule), as a ``ConfigError`` on ``scales``."""
    try:
        return parse_scales(scales)
    except ValueError as err:
        raise ConfigError("scales", str(err)) from None


# numpy's and torch's seeding take unsigned 32-bit seeds.
MAX_SEED = 2**32 - 1
# More loader processes (torchvision) or threads (DALI) than any machine has cores: a typo, which
# would otherwise fork until the machine stops.
MAX_WORKERS = 512


def _check_finite(config: "TrainConfig") -> None:
    """Every number finite: a NaN compares False with every bound below, and an inf learning rate,
    weight decay or clip turns the model into NaN that would then be saved as if it were trained."""
    for field in fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(field.name, f"must be a finite number, got {value}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class TrainConfig:
    data: str | None = None  # None: the embedded texture dataset (see sample_data)
    default_dataset: str = "textures"
    out: str = "runs/latest"
    backend: str = "auto"
    mode: str = "multiscale"
    scales: tuple[int, ...] = DEFAULT_SCALES
    # Progressive mode: explicit "EPOCH:SCALE,..." steps; empty means a linear ramp from the
    # smallest to the largest of `scales`, snapped to `ramp_multiple`.
    schedule: str = ""
    ramp_multiple: int = 32
    epochs: int = 6
    batch_size: int = 32
    model: str = "tiny_cnn"
    pretrained: bool = False
    task: str = "auto"
    consistency_weight: float = 0.0
    consistency_type: str = "kl_divergence"
    teacher: str = "largest"
    # Multi-scale steps: each scale's share of the base loss (losses.base_weights), and BatchNorm
    # shared by the scales or private to each ("": private in multiscale mode with several scales;
    # models/scale_norm.py says why).
    scale_weighting: str = ScaleWeighting.AREA.value
    scale_norm: str = ""
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    amp: str = "auto"
    channels_last: bool = True
    memory_efficient: bool = False
    # With memory_efficient: micro-batch the largest scale of a model with BatchNorm too (BN then
    # normalises each chunk with its own statistics); models without BatchNorm are micro-batched exactly.
    micro_batch_batchnorm: bool = False
    accum_steps: int = 1  # loader batches (micro-batches) per optimiser step
    compile: bool = False  # torch.compile the network (one static graph per scale)
    sync_bn: bool = False  # SyncBatchNorm across the ranks of a torchrun launch (CUDA only)
    grad_clip: float = 0.0
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = only at epoch ends
    on_bad_file: str = "error"  # what the pre-flight scan does with unreadable files: error or skip
    scan: bool = True  # False trusts the data: no pre-flight scan (DALI then stops at a bad file)
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap, checked from headers
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    # The training recipe (training/recipe_config.py checks these; README "The training recipe").
    auto_augment: str = "none"
    rand_n: int = DEFAULT_RAND_N
    rand_m: int = DEFAULT_RAND_M
    random_erase: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = DEFAULT_MIX_PROB
    mix_switch_prob: float = DEFAULT_MIX_SWITCH_PROB
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0: no weight EMA
    select_on: str = ""  # "": the EMA's weights when ema_decay > 0, else the raw ones

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("mode", self.mode, MODES)
        _choice("task", self.task, TASKS)
        _choice("consistency_type", self.consistency_type, CONSISTENCY_TYPES)
        _choice("teacher", self.teacher, TEACHERS)
        _choice("scale_weighting", self.scale_weighting, SCALE_WEIGHTINGS)
        if self.scale_norm:
            _choice("scale_norm", self.scale_norm, SCALE_NORMS)
        if self.scale_norm == ScaleNorm.PRIVATE and self.mode == Mode.PROGRESSIVE:
            raise ConfigError("scale_norm", "private BatchNorm per scale needs every scale trained from the start "
                              "(--mode multiscale); a progressive run would reach its last scale with untrained ones")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("amp", self.amp, AMP_CHOICES)
        _choice("default_dataset", self.default_dataset, DEFAULT_DATASETS)
        _choice("on_bad_file", self.on_bad_file, BAD_FILE_POLICIES)
        check_scales(self.scales)
        _check_finite(self)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "ramp_multiple": self.ramp_multiple,
                    "max_image_pixels": self.max_image_pixels}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")
        non_negative = {
            "consistency_weight": self.consistency_weight,
            "weight_decay": self.weight_decay,
            "warmup_epochs": self.warmup_epochs,
            "grad_clip": self.grad_clip,
            "workers": self.workers,
            "checkpoint_every": self.checkpoint_every,
            "momentum": self.momentum,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(key, f"must be >= 0, got {value}")
        if self.workers > MAX_WORKERS:
            raise ConfigError("workers", f"must be <= {MAX_WORKERS}, got {self.workers}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.momentum >= 1:
            raise ConfigError("momentum", f"must be < 1 (a momentum of 1 or more never forgets a step and "
                              f"diverges), got {self.momentum}")
        if self.schedule and self.mode != "progressive":
            raise ConfigError("schedule", "applies to --mode progressive only (multiscale trains every --scales each step)")
        if self.mode == "progressive" and self.consistency_weight > 0:
            raise ConfigError("consistency_weight", "compares the scales of one step, and progressive mode trains "
                              "one scale per step; use --mode multiscale for consistency")
        if self.memory_efficient and self.teacher != "largest" and self.consistency_weight > 0:
            # One scale's graph at a time needs the target before the students: only the largest
            # scale (computed first) can be it; the ensemble mean needs every scale at once.
            raise ConfigError("memory_efficient", "needs --teacher largest (the ensemble mean needs all scales at once)")
        if self.accum_steps < 1:
            raise ConfigError("accum_steps", f"must be >= 1 (1 = no accumulation), got {self.accum_steps}")
        if self.micro_batch_batchnorm and not self.memory_efficient:
            raise ConfigError("micro_batch_batchnorm", "applies to --memory-efficient only (the naive step "
                              "runs each scale's whole batch at once)")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        try:
            validate_fractions(self.split_fractions)
        except ValueError as err:
            raise ConfigError("split_fractions", str(err)) from None
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ConfigError("device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        check_recipe_fields(self)

    def with_resolved_scale_norm(self) -> "TrainConfig":
        """This configuration with ``scale_norm`` spelled out ("private" or "shared"), as a run records it:
        the checkpoint then says what the network is, whatever later versions resolve "" to."""
        return self.replace(scale_norm=ScaleNorm.PRIVATE.value if self.private_scale_norm else ScaleNorm.SHARED.value)

    @property
    def private_scale_norm(self) -> bool:
        """Whether the network gets one BatchNorm per scale (``scale_norm``, "" resolved by the mode)."""
        if self.scale_norm:
            return self.scale_norm == ScaleNorm.PRIVATE and len(self.scales) > 1
        return self.mode == Mode.MULTISCALE and len(self.scales) > 1

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists, not tuples): what config.json and checkpoints store."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_FIELD_TYPES = {f.name: f for f in fields(TrainConfig)}


def _coerce(key: str, value: Any) -> Any:
    """TOML/JSON values -> field types (lists become tuples); type errors name the key."""
    if key == "scales":  # TOML lists, flags and checkpoints: one parser, which refuses 16.5 instead of rounding it
        return check_scales(value)
    default = _FIELD_TYPES[key].default
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        cast = type(default[0]) if default else int
        try:
            return tuple(cast(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a list of {cast.__name__}, got {value!r}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return type(default)(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def config_from_mapping(values: Mapping[str, Any], *, base: TrainConfig | None = None, source: str = "") -> TrainConfig:
    """``base`` with ``values`` applied; unknown keys are errors naming ``source``."""
    where = f" in {source}" if source else ""
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ConfigError(
            unknown[0], f"unknown key{where}; known keys: {', '.join(sorted(_FIELD_TYPES))}"
        )
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **coerced)


# What a checkpoint written before a key existed meant by its absence: the behaviour of that time.
_BEFORE_KEY_EXISTED: dict[str, Any] = {"scale_norm": ScaleNorm.SHARED.value,
                                       "scale_weighting": ScaleWeighting.EQUAL.value}


def with_keys_before_they_existed(values: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded configuration with the keys added since it was written set to the value
    that reproduces what the run did then, not to today's default."""
    return {**_BEFORE_KEY_EXISTED, **values}


def config_from_checkpoint(values: Mapping[str, Any], *, source: str) -> TrainConfig:
    """The configuration a checkpoint (or its ``config.json``) records (see :func:`with_keys_before_they_existed`)."""
    return config_from_mapping(with_keys_before_they_existed(values), source=source)


RECIPES_PACKAGE = "multiscale_dali.recipes"


def bundled_recipes() -> dict[str, Path]:
    """Name -> file of every recipe shipped with the package (the project's ``pipelines/`` folder)."""
    root = importlib.resources.files(RECIPES_PACKAGE)
    return {entry.name.removesuffix(".toml"): Path(str(entry))
            for entry in sorted(root.iterdir(), key=lambda e: e.name) if entry.name.endswith(".toml")}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A user's TOML file when ``name_or_path`` is one, else the bundled recipe of that name.

    ``pipelines/X.toml`` (the checkout's spelling) also finds the bundled ``X`` from any directory, so
    commands copied from the README work in a container or on a cluster where no checkout exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_recipes()
    name = path.name.removesuffix(".toml")
    if (path.suffix in ("", ".toml")) and (path.parent == Path(".") or path.parent.name == "pipelines") and name in bundled:
        return bundled[name]
    choices = ", ".join(bundled) or "none are installed"
    raise ConfigError("config", f"recipe not found: {name_or_path} (not a file, nor a bundled recipe: {choices})")


def load_recipe(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a TOML recipe (a file or a bundled name): (its ``[train]`` table, its description)."""
    path = resolve_recipe(path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ConfigError("config", f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not a text file (TOML is UTF-8 text)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{path} is not valid TOML: {err}") from None
    unknown = sorted(set(doc) - {"description", "train"})
    if unknown:
        raise ConfigError("config", f"{path}: unknown top-level key {unknown[0]!r}; expected description and [train]")
    train = doc.get("train", {})
    if not isinstance(train, dict):
        raise ConfigError("config", f"{path}: [train] must be a table")
    return train, str(doc.get("description", ""))


def recipe_config(path: str | Path, *, base: TrainConfig | None = None) -> TrainConfig:
    values, _ = load_recipe(path)
    return config_from_mapping(values, base=base, source=str(path))
