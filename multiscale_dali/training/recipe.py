"""The training recipe as a trainer sees it: what happens to a batch before the step, and after it.

Before the step, :meth:`StepRecipe.prepare` applies random erasing (one relative box per sample) and
then MixUp/CutMix with label smoothing (one lambda, one partner permutation and one relative box per
batch), each drawn **once** and applied alike to every scale: the scale-consistency term then compares
the same image at several resolutions. The order is timm's and torchvision's: erasing is a per-sample
transform, mixing happens on the assembled batch. After each optimiser step, :meth:`after_step`
moves the weight EMA. Automatic augmentation is not here: it runs inside the pipelines (see
``pipelines/augment.py``), also one draw per sample for every scale.

Training metrics on a mixed batch count a prediction as right when it is the **dominant label**: the
sample's own label where its weight ``lam`` at that scale is >= 0.5, its partner's otherwise. The
training loss reported is the loss that was optimised (against the soft targets).

State: the EMA (its weights and update count) is the same on every rank and is saved once; the
random generators of erasing and mixing are per rank (each rank draws for its own samples) and are
saved per rank, so a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.training.distributed import DistributedContext
from multiscale_dali.training.ema import ModelEma
from multiscale_dali.training.mixing import MixConfig, Mixer, MixResult
from multiscale_dali.training.random_erase import apply_erase, draw_erase

log = logging.getLogger(__name__)

RAW = "raw"
EMA = "ema"
# Streams of the per-rank generators, so erasing and mixing never share random numbers.
_ERASE_STREAM, _MIX_STREAM = 1, 2


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """A well-mixed 63-bit seed for one generator of one rank (nearby seeds give unrelated streams)."""
    return int(np.random.SeedSequence([int(seed), int(rank), stream]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class RecipeOptions:
    """The step-side recipe: mixing and smoothing (``mix``), random erasing, the weight EMA.

    ``select_ema``: the EMA's weights are the ones validated for model selection and kept as best.
    """

    mix: MixConfig = MixConfig()
    random_erase: float = 0.0
    ema_decay: float = 0.0
    select_ema: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_erase <= 1.0:
            raise ValueError(f"random_erase must be a probability in [0, 1], got {self.random_erase}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.select_ema and self.ema_decay == 0:
            raise ValueError("select_ema needs an EMA (ema_decay > 0)")

    @property
    def soft_targets(self) -> bool:
        """Whether the loss fits soft targets (mixing or label smoothing) rather than the labels."""
        return self.mix.mixing or self.mix.label_smoothing > 0


@dataclass(frozen=True)
class PreparedBatch:
    """A batch as the step trains on it.

    ``batch``: the images to train on (erased, mixed) with the input's hard ``labels`` and ``valid``.
    ``targets``: what the loss fits, the hard labels or per-scale soft targets.
    ``metric_labels``: per scale, the label a prediction is counted right against (the dominant one
    on a mixed batch); ``None`` means ``batch.labels``.
    """

    batch: MultiScaleBatch
    targets: torch.Tensor | Mapping[int, torch.Tensor]
    metric_labels: Mapping[int, torch.Tensor] | None = None

    def target_at(self, scale: int) -> torch.Tensor:
        return self.targets[scale] if isinstance(self.targets, Mapping) else self.targets

    def labels_at(self, scale: int) -> torch.Tensor:
        return self.batch.labels if self.metric_labels is None else self.metric_labels[scale]


def _dominant_labels(mixed: MixResult) -> Mapping[int, torch.Tensor] | None:
    if mixed.draw.partner is None:
        return None
    labels = mixed.batch.labels
    partner_labels = labels[mixed.draw.partner.to(labels.device, non_blocking=True)]
    return {scale: labels if lam >= 0.5 else partner_labels for scale, lam in mixed.lam.items()}


class StepRecipe:
    """Erasing, mixing and the EMA of one trainer; with default options it changes nothing.

    ``model``: the bare network (before any DDP wrapper), copied for the EMA. ``seed`` and ``rank``
    seed the generators; ``task`` (resolved) and ``num_classes`` shape the soft targets.
    """

    def __init__(self, options: RecipeOptions = RecipeOptions(), *, model: nn.Module | None = None,
                 task: str = "multiclass", num_classes: int = 2, seed: int = 0, rank: int = 0) -> None:
        self.options = options
        self._mixer = (Mixer(options.mix, task=task, num_classes=num_classes, seed=stream_seed(seed, rank, _MIX_STREAM))
                       if options.soft_targets else None)
        self._erase_generator = torch.Generator().manual_seed(stream_seed(seed, rank, _ERASE_STREAM))
        if options.ema_decay > 0 and model is None:
            raise ValueError("a weight EMA needs the model it averages")
        # Every rank starts from the same weights (same seed, or the same pretrained file), so every
        # rank's copy is the same average as rank 0's, which is the one saved.
        self._ema = ModelEma(model, decay=options.ema_decay) if options.ema_decay > 0 else None

    # ------------------------------------------------------------------ the step
    def prepare(self, batch: MultiScaleBatch) -> PreparedBatch:
        """Erase, then mix and smooth: one draw shared by every scale of ``batch``."""
        if self.options.random_erase > 0:
            batch = apply_erase(draw_erase(self.options.random_erase, batch.batch_size, self._erase_generator), batch)
        if self._mixer is None:
            return PreparedBatch(batch=batch, targets=batch.labels)
        mixed = self._mixer(batch)
        return PreparedBatch(batch=mixed.batch, targets=mixed.targets, metric_labels=_dominant_labels(mixed))

    def after_step(self, net: nn.Module) -> None:
        """After every optimiser step: move the EMA toward ``net`` (on the device, no sync)."""
        if self._ema is not None:
            self._ema.update(net)

    # ------------------------------------------------------------------ evaluation and selection
    def models(self, net: nn.Module) -> dict[str, nn.Module]:
        """The models validated each epoch: ``{"raw": net}``, and ``"ema"``: the average, with an EMA."""
        return {RAW: net} if self._ema is None else {RAW: net, EMA: self._ema.module}

    @property
    def selected(self) -> str:
        """``"ema"`` or ``"raw"``: whose validation picks the best epoch and whose weights are kept."""
        return EMA if self.options.select_ema else RAW

    # ------------------------------------------------------------------ checkpoint state
    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"erase": self._erase_generator.get_state()}
        if self._mixer is not None:
            state["mixer"] = self._mixer.state_dict()["generator"]
        return state

    def state_dict(self, context: DistributedContext) -> dict[str, Any]:
        """``{"ema": ..., "recipe_rngs": [per rank]}``, empty when the recipe is off (the format stays).

        A collective under DDP (the generator states are gathered): every rank calls it at one step.
        """
        if self._ema is None and self._mixer is None and self.options.random_erase == 0:
            return {}
        state: dict[str, Any] = {"recipe_rngs": context.all_gather_object(self._rng_state())}
        if self._ema is not None:
            state["ema"] = self._ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any], *, rank: int) -> None:
        """Restore :meth:`state_dict`'s keys from a trainer checkpoint; the EMA through its own method."""
        if self._ema is not None:
            if "ema" not in state:
                raise ValueError("the checkpoint has no EMA state, and this run averages the weights")
            self._ema.load_state_dict(state["ema"])
        rngs = state.get("recipe_rngs") or []
        if rank >= len(rngs):
            if rngs or self._mixer is not None or self.options.random_erase > 0:
                log.warning("no saved erase/mix generator for rank %d (%d saved): it starts from its seed", rank,
                            len(rngs))
            return
        self._erase_generator.set_state(rngs[rank]["erase"].cpu())
        if self._mixer is not None:
            self._mixer.load_state_dict({"generator": rngs[rank]["mixer"]})
