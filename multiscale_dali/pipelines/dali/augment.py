"""Automatic augmentation inside a DALI graph: an :class:`AutoAugmentSpec` on ``nvidia.dali.auto_aug``.

Call :func:`auto_augment` on the uint8 HWC batch at the largest scale (after the flip), then resize
the smaller scales from its output: the augmentation is drawn once per sample and every scale shows it.
It runs on CPU operators too (``device_id=None``), so CI exercises the real graph.

Two things the surrounding pipeline must provide:

* ``enable_conditionals=True`` in ``@pipeline_def``: DALI's automatic augmentations pick each
  sample's operation with ``if`` on a DataNode, which DALI only allows with conditionals on;
  :func:`auto_augment` checks this while the graph is defined and raises a ``ValueError`` that says so.
  Checked on DALI 2.4 CPU: a pipeline with conditionals and ``enable_checkpointing=True`` restored from
  its checkpoint replays the augmented batches bit for bit (the operation draws are operator RNG state).
* ``shape`` for ``"rand"`` and ``"auto"``: their translations are a fraction of the image side
  (:data:`~multiscale_dali.pipelines.augment.MAX_TRANSLATE_REL`, torchvision's 150/331), so DALI needs
  the ``(H, W)`` of each sample: a constant pair, or a CPU DataNode holding ``[H, W]`` per sample (the
  ``[s, s]`` float node that sizes the largest resize of a progressive schedule works as is).
  ``"trivial"`` shifts by at most a constant 32 px, as torchvision does, and ignores ``shape``.
"""

from __future__ import annotations

from typing import Sequence

from nvidia.dali import types
from nvidia.dali.auto_aug import auto_augment as dali_auto_augment
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
from nvidia.dali.auto_aug import trivial_augment as dali_trivial_augment
from nvidia.dali.pipeline import DataNode, Pipeline

from multiscale_dali.pipelines.augment import (
    AUGMENT_FILL,
    MAX_TRANSLATE_REL,
    NUM_MAGNITUDE_BINS,
    TRIVIAL_MAX_TRANSLATE_PX,
    AutoAugmentSpec,
)


def _require_conditionals(policy: str) -> None:
    # DALI's own error ("DataNode was used in conditional context") names neither the augmentation
    # nor the pipeline flag's purpose here, so fail first with one that does.
    pipeline = Pipeline.current()
    if pipeline is not None and not getattr(pipeline, "_conditionals_enabled", True):
        raise ValueError(
            f"auto_augment policy {policy!r} needs a pipeline built with enable_conditionals=True "
            "(DALI's automatic augmentations select each sample's operation with `if`)"
        )


def auto_augment(
    images: DataNode,
    spec: AutoAugmentSpec,
    *,
    shape: DataNode | Sequence[float] | None = None,
    seed: int | None = None,
) -> DataNode:
    """``images`` (uint8 HWC, CPU or GPU) augmented per ``spec``, one draw per sample.

    ``shape``: the ``(H, W)`` of the images, required by ``"rand"`` and ``"auto"`` (see the module
    docstring). ``seed``: the seed of the operation draws; ``None`` derives it from the pipeline's
    seed, which is what makes a rebuilt pipeline reproduce them. Policy ``"none"`` returns ``images``
    itself, adding nothing to the graph.
    """
    if not spec.enabled:
        return images
    _require_conditionals(spec.policy)
    common = {"fill_value": AUGMENT_FILL, "interp_type": types.INTERP_LINEAR, "seed": seed}
    if spec.policy == "trivial":
        return dali_trivial_augment.trivial_augment_wide(
            images, num_magnitude_bins=NUM_MAGNITUDE_BINS, max_translate_abs=TRIVIAL_MAX_TRANSLATE_PX, **common
        )
    if shape is None:
        raise ValueError(
            f"auto_augment policy {spec.policy!r} translates by a fraction of the image side: pass "
            "shape=(H, W) or a CPU DataNode holding each sample's [H, W]"
        )
    if spec.policy == "rand":
        return dali_rand_augment.rand_augment(
            images, n=spec.rand_n, m=spec.rand_m, num_magnitude_bins=NUM_MAGNITUDE_BINS,
            shape=shape, max_translate_rel=MAX_TRANSLATE_REL, **common,
        )
    return dali_auto_augment.auto_augment_image_net(
        images, shape=shape, max_translate_rel=MAX_TRANSLATE_REL, **common
    )
