"""Class and probability of image files, with the pipelines' eval geometry and normalisation.

Each image is centre-cropped and every scale resized from the crop, as a single-scale eval batch of
the pipelines (and as ``evaluate`` measures a resolution); several scales predict the mean of their
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from multiscale_dali.errors import EXIT_FAILURE, ConfigError, UserError
from multiscale_dali.constants import EVAL_CROP_FRACTION, TTA_CHOICES, Tta
from multiscale_dali.evaluation.model import LoadedModel
from multiscale_dali.evaluation.tta import multiscale_tta_probabilities
from multiscale_dali.pipelines.batch import normalize_nhwc_uint8
from multiscale_dali.pipelines.sampling import eval_crop_box
from multiscale_dali.pipelines.torchvision_backend import load_rgb, resize_square
from multiscale_dali.training.config import check_scales

DEFAULT_PREDICT_BATCH_SIZE = 64


class ImageError(UserError, ValueError, exit_code=EXIT_FAILURE):
    """An image given to :func:`predict_images` that cannot be read; the message names the file."""


def eval_pixels(path: str | Path, *, scales: Sequence[int],
                eval_crop_fraction: float = EVAL_CROP_FRACTION) -> dict[int, torch.Tensor]:
    """uint8 ``[1, s, s, 3]`` RGB per scale: centre crop, then each scale resized from the crop, as a
    single-scale eval batch of the pipelines emits it (before normalisation)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        image = load_rgb(str(path))
    except RuntimeError as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    top, left, side = eval_crop_box(image.shape[-2], image.shape[-1], eval_crop_fraction)
    crop = image[:, top : top + side, left : left + side]
    return {s: resize_square(crop, s).permute(1, 2, 0).unsqueeze(0) for s in sorted(scales)}


def preprocess_image(path: str | Path, *, scales: Sequence[int], eval_crop_fraction: float = EVAL_CROP_FRACTION,
                     channels_last: bool = True) -> dict[int, torch.Tensor]:
    """Normalised float ``[1, 3, s, s]`` per scale, as a single-scale eval batch of the pipelines.

    Centre crop, then each scale resized from the crop (as ``evaluate_checkpoint`` measures it).
    """
    pixels = eval_pixels(path, scales=scales, eval_crop_fraction=eval_crop_fraction)
    return {s: normalize_nhwc_uint8(x, channels_last=channels_last) for s, x in pixels.items()}


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str  # class name
    index: int
    probability: float  # of the predicted class
    probabilities: tuple[float, ...]  # per class, in checkpoint class order


def check_tta(tta: str) -> str:
    if tta not in TTA_CHOICES:
        raise ConfigError("tta", f"{tta!r} is not one of {', '.join(TTA_CHOICES)}")
    return tta


def predictions_from(paths: Sequence[str | Path], probs: torch.Tensor, classes: Sequence[str]) -> list[Prediction]:
    """One :class:`Prediction` per row of class probabilities ``[N, C]``, in ``paths`` order."""
    predictions = []
    for path, row in zip(paths, probs.cpu()):
        index = int(row.argmax())
        predictions.append(Prediction(path=str(path), label=classes[index], index=index,
                                      probability=float(row[index]), probabilities=tuple(row.tolist())))
    return predictions


@torch.no_grad()
def predict_images(loaded: LoadedModel, paths: Sequence[str | Path], *, scales: Sequence[int],
                   batch_size: int = DEFAULT_PREDICT_BATCH_SIZE, tta: str = Tta.NONE.value) -> list[Prediction]:
    """Class and probability per image; several scales predict the mean of their probabilities, and
    ``tta="flip"`` adds each image's mirror to the mean.

    Every image is read before the model runs, so a bad path fails fast with :class:`ImageError`.
    """
    scales = check_scales(scales)
    flip = check_tta(tta) == Tta.FLIP
    inputs = [preprocess_image(p, scales=scales, channels_last=loaded.config.channels_last) for p in paths]
    predictions: list[Prediction] = []
    for start in range(0, len(inputs), batch_size):
        chunk = {s: torch.cat([x[s] for x in inputs[start : start + batch_size]]).to(loaded.device) for s in scales}
        mean = multiscale_tta_probabilities(loaded.model, chunk, task=loaded.task, flip=flip)
        predictions += predictions_from(paths[start : start + batch_size], mean, loaded.classes)
    return predictions


def default_predict_scales(loaded: LoadedModel) -> tuple[int, ...]:
    """The scale the model was selected at: the largest of the schedule's final stage."""
    return (max(loaded.schedule.final_scales),)
