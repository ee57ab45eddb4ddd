"""Flip test-time augmentation: the mean of the predictions for an image and its horizontal mirror.

Training flips images at random (the pipelines' ``coin_flip``), so the mirror is an image the network
has learnt to classify the same way; averaging the two predictions removes part of the variance of
one view (FFCV's ResNet recipes evaluate this way). Averaging happens on probabilities, as the
multi-scale ensemble does (sigmoid for the one-logit binary task, softmax otherwise), so flip TTA and
the scale ensemble compose: :func:`multiscale_tta_probabilities` over ``S`` scales with flipping is
the plain mean of ``2 S`` predictions.

Everything here is a pure function of tensors already normalised and on the model's device
(``[B, 3, H, W]``, as :class:`~multiscale_dali.pipelines.batch.MultiScaleBatch` holds them); the
model is only called, never put into another mode.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from multiscale_dali.training.losses import ensemble_logits, probabilities

# Width axis of an NCHW tensor (also of a channels_last one: memory format does not change indexing).
WIDTH_DIM = -1

Model = Callable[[torch.Tensor], torch.Tensor]


def horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """The mirror image of an NCHW batch, in the input's memory format (channels_last stays so)."""
    if images.ndim != 4:
        raise ValueError(f"expected images shaped [B, C, H, W], got {tuple(images.shape)}")
    flipped = torch.flip(images, dims=(WIDTH_DIM,))
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        flipped = flipped.contiguous(memory_format=torch.channels_last)
    return flipped


def _views(model: Model, images: torch.Tensor, *, flip: bool) -> list[torch.Tensor]:
    outputs = [model(images)]
    if flip:
        outputs.append(model(horizontal_flip(images)))
    return outputs


@torch.no_grad()
def flip_tta_logits(model: Model, images: torch.Tensor, *, task: str) -> torch.Tensor:
    """Logits whose probabilities are the mean over the image and its mirror.

    The form :func:`~multiscale_dali.evaluation.evaluate.rows_from_logits` and the scale ensemble take
    (``log(mean p)`` for multiclass, ``logit(mean p)`` ``[B, 1]`` for binary); ``task`` is resolved
    (``"binary"`` or ``"multiclass"``).
    """
    return ensemble_logits(_views(model, images, flip=True), task=task)


@torch.no_grad()
def flip_tta_probabilities(model: Model, images: torch.Tensor, *, task: str) -> torch.Tensor:
    """Class probabilities ``[B, C]`` averaged over the image and its horizontal mirror.

    Binary tasks give ``[1 - p, p]`` (C = 2), as :func:`~multiscale_dali.training.losses.probabilities`.
    """
    views = _views(model, images, flip=True)
    return torch.stack([probabilities(out.float(), task=task) for out in views]).mean(dim=0)


@torch.no_grad()
def multiscale_tta_probabilities(model: Model, images: Mapping[int, torch.Tensor], *, task: str,
                                 flip: bool = True) -> torch.Tensor:
    """Mean probabilities over every scale of ``images`` (and each one's mirror when ``flip``).

    ``images[scale]`` holds the same samples at each scale, as a multi-scale eval batch does.
    """
    if not images:
        raise ValueError("multiscale_tta_probabilities needs images at one scale at least")
    sizes = {int(x.shape[0]) for x in images.values()}
    if len(sizes) != 1:
        raise ValueError(f"every scale must hold the same samples, got batch sizes {sorted(sizes)}")
    views = [out for scale in sorted(images) for out in _views(model, images[scale], flip=flip)]
    return torch.stack([probabilities(out.float(), task=task) for out in views]).mean(dim=0)
