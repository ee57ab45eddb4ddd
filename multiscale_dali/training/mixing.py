"""MixUp and CutMix on the device, drawn once per batch and applied alike to every scale.

The semantics are timm's ``Mixup`` in batch mode: with probability ``prob`` a batch is mixed; when
both alphas are set, CutMix is picked with probability ``switch_prob`` and MixUp otherwise; ``lam`` is
drawn from ``Beta(alpha, alpha)``; every sample is mixed with a partner from the same batch; targets
are the label-smoothed one-hots mixed with the same ``lam`` (timm's ``mixup_target``), and CutMix
corrects ``lam`` to the area actually pasted (timm's ``correct_lam=True``).

What is specific to multi-scale training: **one** draw per batch (``lam``, a partner permutation and,
for CutMix, one box in relative coordinates) serves every scale, so the scale-consistency term compares
the same mixed image at several resolutions. The box is scaled to each resolution with rounding, so the
pasted area, and hence the corrected ``lam``, can differ slightly between scales: the result carries
**per-scale soft targets** (``MixResult.targets[scale]``) and per-scale ``lam``. MixUp has one ``lam``.

Reproducibility: a draw is a function of a CPU ``torch.Generator``'s state and nothing else (no global
RNG), the draws happen on the host (no device sync), and :class:`Mixer` saves and restores that state,
so a resumed run mixes exactly as the uninterrupted one. In data-parallel training give every rank its
own :class:`Mixer` seed (e.g. derived from the seed and the rank), as timm's per-process RNG does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.soft_targets import smooth_targets

NO_MIX = "none"
MIXUP = "mixup"
CUTMIX = "cutmix"


@dataclass(frozen=True)
class MixConfig:
    """timm's ``--mixup``, ``--cutmix``, ``--mixup-prob``, ``--mixup-switch-prob`` and ``--smoothing``.

    Mixing is on when an alpha is > 0 and ``prob`` > 0; with both alphas 0 only label smoothing applies.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        for key in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, key)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(key, f"must be a finite number >= 0 (0 turns it off), got {value!r}")
        for key in ("prob", "switch_prob"):
            value = getattr(self, key)
            if not _is_real(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(key, f"must be a probability in [0, 1], got {value!r}")
        if not _is_real(self.label_smoothing) or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing!r}")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MixDraw:
    """One batch's random draw, independent of resolution.

    ``kind``: ``"none"``, ``"mixup"`` or ``"cutmix"``. ``lam``: the drawn weight of each sample itself
    (1.0 when not mixing; for CutMix the nominal value, before the per-scale correction). ``partner``:
    int64 ``[B]`` on the CPU, sample ``b`` is mixed with sample ``partner[b]`` (``None`` when not mixing).
    ``box``: CutMix's pasted region as fractions of the image, ``(top, bottom, left, right)`` in [0, 1].
    """

    kind: str
    lam: float = 1.0
    partner: torch.Tensor | None = None
    box: tuple[float, float, float, float] | None = None

    def pixel_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The CutMix box at one resolution, ``(y0, y1, x0, x1)`` with half-open rows/columns; rounded."""
        if self.box is None:
            raise ValueError(f"a {self.kind!r} draw has no box")
        top, bottom, left, right = self.box
        return _round(top * height), _round(bottom * height), _round(left * width), _round(right * width)

    def lam_at(self, height: int, width: int) -> float:
        """The weight of each sample itself at one resolution: for CutMix, 1 - the pasted area's share."""
        if self.kind != CUTMIX:
            return self.lam
        y0, y1, x0, x1 = self.pixel_box(height, width)
        return 1.0 - (y1 - y0) * (x1 - x0) / (height * width)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up, not Python's round-half-to-even


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of ``Beta(alpha, alpha)`` as ``X / (X + Y)`` with ``X, Y ~ Gamma(alpha)`` from ``generator``."""
    # torch.distributions.Beta takes no generator; _standard_gamma (what it uses inside) does.
    x, y = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator).tolist()
    # Both gammas underflow to 0 only for alpha far below any recipe's (< ~1e-3); Beta's mean then.
    return x / (x + y) if x + y > 0 else 0.5


def _uniform(generator: torch.Generator, count: int = 1) -> list[float]:
    return torch.rand(count, generator=generator, dtype=torch.float64).tolist()


def draw_mix(config: MixConfig, batch_size: int, generator: torch.Generator) -> MixDraw:
    """Draw one batch's mixing from ``generator`` (a CPU generator), timm's order of decisions.

    Consumes nothing from ``generator`` when ``config.mixing`` is off; otherwise the number of values
    it consumes depends only on the draws themselves, so equal generator states give equal draws.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not config.mixing:
        return MixDraw(NO_MIX)
    (u,) = _uniform(generator)
    if u >= config.prob:
        return MixDraw(NO_MIX)
    if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
        (switch,) = _uniform(generator)
        use_cutmix = switch < config.switch_prob
    else:
        use_cutmix = config.cutmix_alpha > 0
    lam = _beta(config.cutmix_alpha if use_cutmix else config.mixup_alpha, generator)
    partner = torch.randperm(batch_size, generator=generator)
    if not use_cutmix:
        return MixDraw(MIXUP, lam=lam, partner=partner)
    # timm's rand_bbox in relative units: a box of side sqrt(1 - lam) per axis, centred uniformly,
    # clipped to the image (which is what makes the corrected lam differ from the drawn one).
    cy, cx = _uniform(generator, 2)
    half = math.sqrt(1.0 - lam) / 2
    box = (max(cy - half, 0.0), min(cy + half, 1.0), max(cx - half, 0.0), min(cx + half, 1.0))
    return MixDraw(CUTMIX, lam=lam, partner=partner, box=box)


@dataclass(frozen=True)
class MixResult:
    """A mixed batch: ``batch`` keeps the hard ``labels`` and ``valid`` mask of the input (for metrics);
    ``targets[scale]`` is that scale's soft target (float32 ``[B, C]`` multiclass, ``[B]`` binary) and
    ``lam[scale]`` its weight of each sample itself."""

    batch: MultiScaleBatch
    targets: Mapping[int, torch.Tensor]
    lam: Mapping[int, float]
    draw: MixDraw


def _mix_images(images: torch.Tensor, draw: MixDraw, partner: torch.Tensor) -> torch.Tensor:
    if draw.kind == MIXUP:
        # lerp(x, x[p], 1 - lam) = lam * x + (1 - lam) * x[p]; keeps dtype and memory format.
        return images.lerp(images[partner], 1.0 - draw.lam)
    y0, y1, x0, x1 = draw.pixel_box(images.shape[-2], images.shape[-1])
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[partner, :, y0:y1, x0:x1]
    return mixed


def apply_mix(draw: MixDraw, batch: MultiScaleBatch, *, smoothing: float, task: str, num_classes: int) -> MixResult:
    """Apply one draw to every scale of ``batch``: a pure function (the input tensors are not modified).

    Targets are ``lam_s * t + (1 - lam_s) * t[partner]`` with ``t`` the label-smoothed targets of
    :func:`~multiscale_dali.training.soft_targets.smooth_targets`. Padded samples (``valid`` False) are
    mixed like the others (they are real images, duplicated) and the mask passes through unchanged.
    A ``"none"`` draw returns the input images themselves and the smoothed targets at every scale.
    """
    size = batch.batch_size
    for scale, images in batch.images.items():
        if images.ndim != 4 or images.shape[0] != size:
            raise ValueError(f"scale {scale}: expected images [{size}, C, H, W], got {tuple(images.shape)}")
    if draw.partner is not None and tuple(draw.partner.shape) != (size,):
        raise ValueError(f"the draw pairs {tuple(draw.partner.shape)} samples, the batch has {size}")
    targets = smooth_targets(batch.labels, smoothing=smoothing, task=task, num_classes=num_classes)
    if draw.kind == NO_MIX:
        return MixResult(batch=batch, targets={s: targets for s in batch.images},
                         lam={s: 1.0 for s in batch.images}, draw=draw)
    partner = draw.partner.to(batch.labels.device, non_blocking=True)
    partner_targets = targets[partner]
    images, mixed_targets, lams = {}, {}, {}
    for scale, scale_images in batch.images.items():
        images[scale] = _mix_images(scale_images, draw, partner.to(scale_images.device, non_blocking=True))
        lams[scale] = draw.lam_at(scale_images.shape[-2], scale_images.shape[-1])
        mixed_targets[scale] = targets.lerp(partner_targets, 1.0 - lams[scale])
    mixed = MultiScaleBatch(images=images, labels=batch.labels, valid=batch.valid)
    return MixResult(batch=mixed, targets=mixed_targets, lam=lams, draw=draw)


class Mixer:
    """``mixer(batch) -> MixResult``: :func:`draw_mix` from its own generator, then :func:`apply_mix`.

    ``task`` is a resolved task (``"binary"`` or ``"multiclass"``). :meth:`state_dict` holds the
    generator's state as a uint8 tensor, which ``torch.load(weights_only=True)`` accepts; loading it
    makes the next batches mix exactly as they would have in the run that saved it.
    """

    def __init__(self, config: MixConfig, *, task: str, num_classes: int, seed: int) -> None:
        self.config = config
        self.task = task
        self.num_classes = num_classes
        smooth_targets(torch.zeros(1, dtype=torch.long), smoothing=config.label_smoothing, task=task,
                       num_classes=num_classes)  # fail on a bad task / class count now, not at step 1
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))

    def __call__(self, batch: MultiScaleBatch) -> MixResult:
        draw = draw_mix(self.config, batch.batch_size, self._generator)
        return apply_mix(draw, batch, smoothing=self.config.label_smoothing, task=self.task,
                         num_classes=self.num_classes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        generator_state = state.get("generator") if isinstance(state, Mapping) else None
        if not isinstance(generator_state, torch.Tensor) or generator_state.dtype != torch.uint8:
            raise ValueError("mixer state needs a 'generator' uint8 tensor (from Mixer.state_dict())")
        self._generator.set_state(generator_state.cpu())
