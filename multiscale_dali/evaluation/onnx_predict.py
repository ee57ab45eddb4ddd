"""``predict`` with an ONNX file written by ``msdali export`` instead of a checkpoint.

The file carries what a prediction needs besides the graph: the class names, the task (one logit for
binary, one per class otherwise) and the scales it was exported for (:data:`META_CLASSES`,
:data:`META_TASK`, ``export.META_SCALES``). Images get the same eval geometry as ``predict`` with a
checkpoint (:func:`~multiscale_dali.evaluation.predict.eval_pixels`), so both give the same classes;
:class:`~multiscale_dali.evaluation.export.OnnxClassifier` feeds them in whichever input layout the file
has. Flip TTA and several scales average probabilities exactly as the PyTorch path does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from multiscale_dali.constants import Tta
from multiscale_dali.evaluation.export import META_SCALES, ExportError, OnnxClassifier
from multiscale_dali.evaluation.predict import Prediction, check_tta, eval_pixels, predictions_from
from multiscale_dali.training.config import check_scales
from multiscale_dali.training.losses import probabilities

ONNX_SUFFIX = ".onnx"
# Metadata keys ``msdali export`` writes besides the layout and scales of export.py.
META_CLASSES = "msdali.classes"  # JSON list of class names, in label order
META_TASK = "msdali.task"
META_CHECKPOINT = "msdali.checkpoint"


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


@dataclass(frozen=True)
class OnnxModel:
    """An exported classifier and what its metadata says about it."""

    classifier: OnnxClassifier
    classes: tuple[str, ...]
    task: str
    scales: tuple[int, ...]  # the scales it was exported for

    @property
    def path(self) -> Path:
        return self.classifier.path


def load_onnx_model(path: str | Path) -> OnnxModel:
    """Open an ONNX file exported by ``msdali export``; :class:`ExportError` when its metadata is missing
    (a file from elsewhere has no class names to print)."""
    classifier = OnnxClassifier(path)
    meta = classifier.metadata
    missing = [key for key in (META_CLASSES, META_TASK, META_SCALES) if key not in meta]
    if missing:
        raise ExportError(f"{classifier.path} lacks the metadata {', '.join(missing)}: predict takes ONNX files "
                          "written by `msdali export` (they carry the class names and the task)")
    scales = tuple(int(s) for s in meta[META_SCALES].split(","))
    return OnnxModel(classifier=classifier, classes=tuple(json.loads(meta[META_CLASSES])), task=meta[META_TASK],
                     scales=scales)


def default_onnx_scales(model: OnnxModel) -> tuple[int, ...]:
    """A fixed-size file's own size; else the largest scale it was exported for."""
    if model.classifier.input_size is not None:
        return (model.classifier.input_size[0],)
    return (max(model.scales),)


def _probabilities(model: OnnxModel, pixels: np.ndarray, *, flip: bool) -> torch.Tensor:
    views = [pixels, pixels[:, :, ::-1]] if flip else [pixels]  # NHWC: axis 2 is the width
    probs = [probabilities(torch.from_numpy(model.classifier.predict(np.ascontiguousarray(v))).float(),
                           task=model.task) for v in views]
    return torch.stack(probs).mean(dim=0)


def predict_onnx(model: OnnxModel, paths: Sequence[str | Path], *, scales: Sequence[int],
                 tta: str = Tta.NONE.value) -> list[Prediction]:
    """Class and probability per image, as :func:`~multiscale_dali.evaluation.predict.predict_images`.

    Raises :class:`~multiscale_dali.evaluation.export.OnnxInputError` when a fixed-size file is asked
    for another scale, and :class:`~multiscale_dali.evaluation.predict.ImageError` for an unreadable image
    (every image is read before the model runs).
    """
    scales = check_scales(scales)
    flip = check_tta(tta) == Tta.FLIP
    inputs = [eval_pixels(p, scales=scales) for p in paths]
    if not inputs:
        return []
    per_scale = [_probabilities(model, torch.cat([x[s] for x in inputs]).numpy(), flip=flip) for s in scales]
    return predictions_from(paths, torch.stack(per_scale).mean(dim=0), model.classes)
