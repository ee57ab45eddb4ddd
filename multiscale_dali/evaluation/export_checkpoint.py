"""``msdali export``: a run's checkpoint to ONNX, then checked against PyTorch on the run's own images.

The check is the point: an exported graph that differs from the network (an operator exported
differently, a normalisation constant wrong) is found here, on real images of the run's test split at
every exported scale, not in deployment. The figures (largest absolute logit difference and the share of
images whose predicted class agrees) go into a JSON file beside the ``.onnx``
(:func:`verification_path`); a difference beyond the tolerance is an error naming the scale. The file
is written beside the target and moved onto it only once verified, so a failed export never replaces
a good file; one that fails its check is kept as ``NAME.rejected.onnx`` for inspection.

The file also carries what ``predict`` needs to use it without the checkpoint: class names, task and
exported scales (ONNX metadata, see :mod:`~multiscale_dali.evaluation.onnx_predict`). A network with
BatchNorm private to each trained scale is exported with the branch of the largest exported scale.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multiscale_dali.constants import ONNX_VERIFY_IMAGES
from multiscale_dali.errors import ConfigError
from multiscale_dali.evaluation.evaluate import load_splits, resolve_data_root
from multiscale_dali.evaluation.export import DEFAULT_TOLERANCE, OnnxMismatchError, export_onnx, verify_onnx
from multiscale_dali.evaluation.model import LoadedModel, load_model
from multiscale_dali.evaluation.onnx_predict import META_CHECKPOINT, META_CLASSES, META_TASK
from multiscale_dali.fileio import atomic_write_text
from multiscale_dali.models.input_size import check_model_scales
from multiscale_dali.models.scale_norm import collapse_scale_norm, has_private_scale_norm
from multiscale_dali.pipelines.torchvision_backend import load_rgb
from multiscale_dali.training.losses import num_outputs

log = logging.getLogger(__name__)

DEFAULT_VERIFY_IMAGES = ONNX_VERIFY_IMAGES
VERIFY_SUFFIX = ".verify.json"
STAGING_SUFFIX = ".partial.onnx"
REJECTED_SUFFIX = ".rejected.onnx"
# Splits the verification images come from, in order of preference: the test split is what the
# reported accuracy is measured on; a run without one still has validation or training images.
VERIFY_SPLITS: tuple[str, ...] = ("test", "val", "train")


@dataclass(frozen=True)
class ExportOptions:
    scales: tuple[int, ...]
    out: Path
    dynamic: bool = False
    with_preprocessing: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    verify_images: int = DEFAULT_VERIFY_IMAGES
    data: str | None = None  # None: the dataset the run trained on

    def __post_init__(self) -> None:
        if not self.scales:
            raise ConfigError("scales", "need at least one scale to export")
        if not self.dynamic and len(set(self.scales)) != 1:
            raise ConfigError("scales", f"a fixed-shape export takes exactly one scale, got "
                                        f"{','.join(map(str, sorted(set(self.scales))))}; add --dynamic to serve several")
        if not self.tolerance > 0:
            raise ConfigError("tolerance", f"must be > 0, got {self.tolerance}")
        if self.verify_images < 1:
            raise ConfigError("verify_images", f"must be >= 1, got {self.verify_images}")
        if Path(self.out).suffix.lower() != ".onnx":
            raise ConfigError("out", f"{self.out}: the file name must end in .onnx")


def verification_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.verify.json``, beside it."""
    return onnx_path.with_name(onnx_path.stem + VERIFY_SUFFIX)


def verification_images(loaded: LoadedModel, *, data: str | None, count: int) -> tuple[str, list[np.ndarray]]:
    """``(split name, up to count uint8 HWC RGB images)`` of the run's dataset, test split first.

    Files are taken spread over the split (it is sorted by class), so every class is represented.
    """
    splits = load_splits(loaded, resolve_data_root(loaded, data))
    name = next((n for n in VERIFY_SPLITS if len(splits.split(n))), None)
    if name is None:
        raise ConfigError("data", "the run's dataset holds no images to verify the export on")
    files = splits.split(name).files
    picked = [files[i] for i in np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)]
    return name, [load_rgb(path).permute(1, 2, 0).numpy() for path in picked]


def export_checkpoint(checkpoint: str | Path, *, options: ExportOptions) -> dict[str, Any]:
    """Export ``checkpoint`` to ``options.out``, verify it, write the verification JSON; return it.

    Raises :class:`~multiscale_dali.evaluation.export.OnnxMismatchError` beyond the tolerance,
    :class:`~multiscale_dali.models.registry.ModelError` for a scale the model cannot run at, and
    :class:`~multiscale_dali.extras.MissingExtraError` without the ``export`` extra.
    """
    loaded = load_model(checkpoint, device="cpu")
    scales = tuple(sorted(set(options.scales)))
    check_model_scales(loaded.config.model, scales, num_outputs=num_outputs(loaded.task, len(loaded.classes)))
    if has_private_scale_norm(loaded.model):
        # An ONNX graph cannot pick a BatchNorm branch by input size: it carries the branch of the
        # largest exported scale, and is verified against that same network at every scale.
        level = logging.WARNING if len(scales) > 1 else logging.INFO
        log.log(level, "BatchNorm private to each trained scale: the export carries the %d px branch for every "
                "input size, so at %s its outputs differ from the checkpoint's (export once per scale instead)",
                scales[-1], ", ".join(f"{s} px" for s in scales[:-1]) or "other sizes")
        collapse_scale_norm(loaded.model, scales[-1])
    out = Path(options.out)
    split, images = verification_images(loaded, data=options.data, count=options.verify_images)
    metadata = {META_CLASSES: json.dumps(list(loaded.classes)), META_TASK: loaded.task,
                META_CHECKPOINT: str(loaded.path)}
    # Written beside the target and renamed onto it only once verified: a file already at --out is
    # never replaced by an export that failed its check.
    staging = out.with_name(out.stem + STAGING_SUFFIX)
    try:
        export_onnx(loaded.model, scales=scales, dynamic=options.dynamic,
                    with_preprocessing=options.with_preprocessing, out=staging, metadata=metadata)
        report = verify_onnx(staging, loaded.model, images, scales=scales, tolerance=options.tolerance)
    except OnnxMismatchError as err:
        rejected = out.with_name(out.stem + REJECTED_SUFFIX)
        os.replace(staging, rejected)  # kept for inspection, under a name no deployment picks up
        raise OnnxMismatchError(path=rejected, scale=err.scale, max_abs_diff=err.max_abs_diff,
                                tolerance=err.tolerance) from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, out)
    report = {"checkpoint": str(loaded.path), "split": split, "dynamic": options.dynamic,
              "with_preprocessing": options.with_preprocessing, "classes": list(loaded.classes),
              "task": loaded.task, **report, "file": str(out)}
    atomic_write_text(verification_path(out), json.dumps(report, indent=2) + "\n")
    log.info("verified %s on %d %s images at %s px: max |logit diff| %.3g, agreement %.1f%%", out,
             report["num_images"], split, ",".join(map(str, scales)), report["max_abs_diff"],
             100 * report["agreement"])
    return report
