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

from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.constants import EVAL_CROP_FRACTION
from multiscale_dali.evaluation.model import LoadedModel
from multiscale_dali.pipelines.batch import normalize_nhwc_uint8
from multiscale_dali.pipelines.sampling import eval_crop_box
from multiscale_dali.pipelines.torchvision_backend import load_rgb, resize_square
from multiscale_dali.training.config import check_scales
from multiscale_dali.training.losses import probabilities

DEFAULT_PREDICT_BATCH_SIZE = 64


class ImageError(UserError, ValueError, exit_code=EXIT_FAILURE):
    """An image given to :func:`predict_images` that cannot be read; the message names the file."""


def preprocess_image(path: str | Path, *, scales: Sequence[int], eval_crop_fraction: float = EVAL_CROP_FRACTION,
                     channels_last: bool = True) -> dict[int, torch.Tensor]:
    """Normalised float ``[1, 3, s, s]`` per scale, as a single-scale eval batch of the pipelines.

    Centre crop, then each scale resized from the crop (as ``evaluate_checkpoint`` measures it).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        image = load_rgb(str(path))
    except RuntimeError as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    top, left, side = eval_crop_box(image.shape[-2], image.shape[-1], eval_crop_fraction)
    crop = image[:, top : top + side, left : left + side]
    return {s: normalize_nhwc_uint8(resize_square(crop, s).permute(1, 2, 0).unsqueeze(0), channels_last=channels_last)
            for s in sorted(scales)}


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str  # class name
    index: int
    probability: float  # of the predicted class
    probabilities: tuple[float, ...]  # per class, in checkpoint class order


@torch.no_grad()
def predict_images(loaded: LoadedModel, paths: Sequence[str | Path], *, scales: Sequence[int],
                   batch_size: int = DEFAULT_PREDICT_BATCH_SIZE) -> list[Prediction]:
    """Class and probability per image; several scales predict the mean of their probabilities.

    Every image is read before the model runs, so a bad path fails fast with :class:`ImageError`.
    """
    scales = check_scales(scales)
    inputs = [preprocess_image(p, scales=scales, channels_last=loaded.config.channels_last) for p in paths]
    predictions: list[Prediction] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        per_scale = [probabilities(loaded.model(torch.cat([x[s] for x in chunk]).to(loaded.device)).float(),
                                   task=loaded.task) for s in scales]
        mean = torch.stack(per_scale).mean(dim=0).cpu()
        for offset, probs in enumerate(mean):
            index = int(probs.argmax())
            predictions.append(Prediction(path=str(paths[start + offset]), label=loaded.classes[index], index=index,
                                          probability=float(probs[index]), probabilities=tuple(probs.tolist())))
    return predictions


def default_predict_scales(loaded: LoadedModel) -> tuple[int, ...]:
    """The scale the model was selected at: the largest of the schedule's final stage."""
    return (max(loaded.schedule.final_scales),)
