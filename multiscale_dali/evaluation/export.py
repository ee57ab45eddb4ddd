"""ONNX export of a trained network, its verification against PyTorch, and an ONNX-file predictor.

Two input layouts, told apart by the graph's input type alone (:func:`input_layout_of`):

* ``float_nchw`` (``with_preprocessing=False``): the bare network; the caller feeds normalised float
  ``[B, 3, H, W]`` exactly as :func:`~multiscale_dali.pipelines.batch.normalize_nhwc_uint8` makes it.
* ``uint8_nhwc`` (``with_preprocessing=True``): the pipelines' normalisation is part of the graph, so
  the caller feeds the uint8 ``[B, H, W, 3]`` RGB a decoder produces and cannot get the statistics
  wrong. The graph calls the same normalisation function the pipelines use, so the two cannot drift.

Shapes: ``dynamic=True`` exports dynamic batch, height and width (one file serves every scale; the
networks end in global pooling). ``dynamic=False`` fixes height and width at the one given scale,
which lets graph optimisers (TensorRT, onnxruntime) specialise; the batch axis stays dynamic either
way, since a server batches however many requests it has.

Exporter: torch 2.14's default ``torch.onnx.export(dynamo=True)`` needs ``onnxscript``, which is not
part of the ``export`` extra; the TorchScript-based exporter (``dynamo=False``) needs only ``onnx``
and handles every registry model (its deprecation notices are silenced here). ``onnx`` and
``onnxruntime`` are the optional ``export`` extra; without them every entry point raises
:class:`~multiscale_dali.extras.MissingExtraError`.

Evaluation geometry for :func:`verify_onnx`: each image is centre-cropped (``EVAL_CROP_FRACTION``)
and resized antialiased to each scale, as ``evaluate``/``predict`` do, so the logits compared are the
ones a deployment would produce.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from multiscale_dali.constants import EVAL_CROP_FRACTION, ONNX_TOLERANCE
from multiscale_dali.errors import ConfigError, UserError
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.pipelines.batch import normalize_nhwc_uint8

log = logging.getLogger(__name__)

EXPORT_EXTRA = "export"
# Opset 17 is read by every onnxruntime since 1.11 and by TensorRT 8.6+; nothing here needs newer ops.
DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
UINT8_NHWC = "uint8_nhwc"
FLOAT_NCHW = "float_nchw"
INPUT_LAYOUTS: tuple[str, ...] = (UINT8_NHWC, FLOAT_NCHW)
DEFAULT_TOLERANCE = ONNX_TOLERANCE  # why this value: constants.py
# Keys of the metadata written into the ONNX file (read back by OnnxClassifier.metadata).
META_LAYOUT = "msdali.input_layout"
META_SCALES = "msdali.scales"
META_DYNAMIC = "msdali.dynamic"
_DIMS = ("batch", "height", "width")
_EXPORTER_NOISE = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
)


class ExportError(UserError, ValueError):
    """An export or an ONNX file that cannot serve as asked; the message names the file or the flag."""


class OnnxInputError(ExportError):
    """An ONNX file (or a batch for it) whose input is not what msdali feeds; names both."""


class OnnxMismatchError(ExportError):
    """onnxruntime's logits differ from PyTorch's beyond the tolerance at ``scale``."""

    def __init__(self, *, path: Path, scale: int, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"{path}: at {scale} px the ONNX logits differ from PyTorch's by up to {max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}); the export is not faithful at this scale"
        )
        self.path, self.scale, self.max_abs_diff, self.tolerance = path, scale, max_abs_diff, tolerance


# ---------------------------------------------------------------------------------------- extras
def _require(module: str, feature: str) -> ModuleType:
    try:
        return __import__(module)
    except ImportError as err:
        raise MissingExtraError(feature=feature, extra=EXPORT_EXTRA, cause=err) from None


# ---------------------------------------------------------------------------------------- export
class WithPreprocessing(nn.Module):
    """``net`` behind the pipelines' normalisation: uint8 ``[B, H, W, 3]`` RGB in, logits out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize_nhwc_uint8(images, channels_last=False))


def _check_scales(scales: Sequence[int], *, dynamic: bool) -> tuple[int, ...]:
    checked = tuple(sorted(set(int(s) for s in scales)))
    if not checked or any(s < 1 for s in checked):
        raise ConfigError("scales", f"need at least one positive scale, got {list(scales)}")
    if not dynamic and len(checked) != 1:
        raise ConfigError("scales", f"a fixed-shape export takes exactly one scale, got {list(checked)}; "
                                    "export with dynamic shapes to serve several")
    return checked


def _export_copy(model: nn.Module) -> nn.Module:
    # A float32 CPU copy in eval mode: the caller's model keeps its device, dtype and mode, and the
    # export never traces train-mode BatchNorm or dropout.
    return copy.deepcopy(model).to("cpu", dtype=torch.float32, memory_format=torch.contiguous_format).eval()


def export_onnx(model: nn.Module, *, scales: Sequence[int], dynamic: bool, with_preprocessing: bool, out: Path,
                opset: int = DEFAULT_OPSET, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as ONNX to ``out`` and return the path.

    ``scales``: every scale the file is meant for (one when ``dynamic`` is False: height and width are
    fixed to it). ``with_preprocessing``: input uint8 NHWC RGB, normalised inside the graph; else
    normalised float NCHW. ``metadata``: extra string pairs stored in the file (e.g. classes, task).
    The caller's model is not modified. Raises :class:`ConfigError` for bad scales,
    :class:`ExportError` when the exporter fails, :class:`MissingExtraError` without ``onnx``.
    """
    onnx = _require("onnx", "ONNX export")
    checked = _check_scales(scales, dynamic=dynamic)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = _export_copy(model)
    module = WithPreprocessing(net) if with_preprocessing else net
    scale = checked[-1]
    example = (torch.zeros(1, scale, scale, 3, dtype=torch.uint8) if with_preprocessing
               else torch.zeros(1, 3, scale, scale))
    spatial = (1, 2) if with_preprocessing else (2, 3)
    axes = {0: _DIMS[0]}
    if dynamic:
        axes.update({spatial[0]: _DIMS[1], spatial[1]: _DIMS[2]})
    try:
        with warnings.catch_warnings(), torch.no_grad():
            for text in _EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=text)
            # The tracer warns that the normalisation's statistics and its input check become graph
            # constants: exactly what is meant (they are constants of the pipelines).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(module, (example,), str(out), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: _DIMS[0]}})
    except Exception as err:  # the exporter raises many types for unsupported ops; one answer for all
        raise ExportError(f"cannot export {type(model).__name__} to {out} (opset {opset}): "
                          f"{type(err).__name__}: {err}") from err
    proto = onnx.load(str(out))
    entries = {META_LAYOUT: UINT8_NHWC if with_preprocessing else FLOAT_NCHW,
               META_SCALES: ",".join(map(str, checked)), META_DYNAMIC: str(bool(dynamic)).lower(),
               **dict(metadata or {})}
    onnx.helper.set_model_props(proto, entries)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    log.info("exported %s to %s (%s input, %s)", type(model).__name__, out, entries[META_LAYOUT],
             "dynamic shapes" if dynamic else f"{scale}x{scale}")
    return out


# ---------------------------------------------------------------------------------------- reading
def _dim(value: Any) -> int | None:
    """A fixed dimension as int; a named (dynamic) one as None."""
    return value if isinstance(value, int) and value > 0 else None


def input_layout_of(path: Path, *, input_type: str, shape: Sequence[Any]) -> tuple[str, int | None, int | None]:
    """``(layout, height, width)`` of an ONNX input (height/width None when dynamic).

    Raises :class:`OnnxInputError` naming the file when the input is neither layout msdali exports.
    """
    expected = ("uint8 [batch, height, width, 3] (exported with preprocessing) or float "
                "[batch, 3, height, width] (without)")
    dims = [_dim(d) for d in shape]
    if len(dims) == 4 and input_type == "tensor(uint8)" and dims[3] == 3:
        return UINT8_NHWC, dims[1], dims[2]
    if len(dims) == 4 and input_type == "tensor(float)" and dims[1] == 3:
        return FLOAT_NCHW, dims[2], dims[3]
    raise OnnxInputError(f"{path}: its input is {input_type} {list(shape)}; expected {expected}")


class OnnxClassifier:
    """An exported ONNX file run by onnxruntime on uint8 NHWC RGB batches, whatever its input layout.

    ``input_layout`` is ``"uint8_nhwc"`` (preprocessing inside the graph) or ``"float_nchw"`` (this
    class normalises as the pipelines do). ``input_size`` is ``(height, width)``, or None when dynamic.
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        ort = _require("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX file not found: {self.path}")
        try:
            self._session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise ExportError(f"{self.path} is not a loadable ONNX model: {err}") from None
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise OnnxInputError(f"{self.path}: has {len(inputs)} inputs; expected one image input")
        self._input_name = inputs[0].name
        self.input_layout, height, width = input_layout_of(self.path, input_type=inputs[0].type,
                                                           shape=inputs[0].shape)
        self.input_size: tuple[int, int] | None = None if height is None or width is None else (height, width)
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    def _check_batch(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise OnnxInputError(f"{self.path}: predict takes uint8 [batch, height, width, 3] RGB, got "
                                 f"{batch.dtype} {list(batch.shape)}")
        if self.input_size is not None and tuple(batch.shape[1:3]) != self.input_size:
            height, width = self.input_size
            raise OnnxInputError(f"{self.path}: exported for {height}x{width} input, got "
                                 f"{batch.shape[1]}x{batch.shape[2]}")

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits, float32 ``[B, outputs]``, of a uint8 ``[B, H, W, 3]`` RGB batch."""
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        self._check_batch(array)
        if self.input_layout == FLOAT_NCHW:
            array = normalize_nhwc_uint8(torch.from_numpy(np.ascontiguousarray(array)), channels_last=False).numpy()
        return self._session.run(None, {self._input_name: np.ascontiguousarray(array)})[0]


# ---------------------------------------------------------------------------------------- verify
def eval_batch(images: Sequence[np.ndarray] | np.ndarray | torch.Tensor, scale: int, *,
               eval_crop_fraction: float = EVAL_CROP_FRACTION) -> torch.Tensor:
    """uint8 ``[N, scale, scale, 3]``: each image centre-cropped and resized as evaluation does."""
    from multiscale_dali.pipelines.sampling import eval_crop_box
    from multiscale_dali.pipelines.torchvision_backend import resize_square

    resized = []
    for image in images:
        hwc = torch.as_tensor(np.asarray(image))
        if hwc.dtype != torch.uint8 or hwc.ndim != 3 or hwc.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [H, W, 3] RGB, got {hwc.dtype} {list(hwc.shape)}")
        top, left, side = eval_crop_box(hwc.shape[0], hwc.shape[1], eval_crop_fraction)
        crop = hwc.permute(2, 0, 1)[:, top: top + side, left: left + side]
        resized.append(resize_square(crop, scale).permute(1, 2, 0))
    if not resized:
        raise ValueError("verification needs at least one image")
    return torch.stack(resized)


def _agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of images whose predicted class is the same (one logit: the sign of it)."""
    if reference.shape[1] == 1:
        return float(np.mean((reference[:, 0] > 0) == (candidate[:, 0] > 0)))
    return float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))


@torch.no_grad()
def verify_onnx(onnx_path: Path, model: nn.Module, images: Sequence[np.ndarray] | np.ndarray | torch.Tensor, *,
                scales: Sequence[int], tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Run onnxruntime and PyTorch on the same images at each scale and compare their logits.

    ``images``: uint8 ``[H, W, 3]`` RGB arrays of any sizes, or one ``[N, H, W, 3]`` batch. Returns
    ``{"file", "input_layout", "tolerance", "num_images", "max_abs_diff", "agreement",
    "scales": {"<scale>": {"max_abs_diff", "agreement"}}}`` (the top-level figures are the worst over
    the scales). Raises :class:`OnnxMismatchError` naming the first scale beyond ``tolerance``, and
    :class:`OnnxInputError` when the file cannot take a scale (fixed to another size).
    """
    if tolerance <= 0:
        raise ConfigError("tolerance", f"must be > 0, got {tolerance}")
    checked = _check_scales(scales, dynamic=True)
    classifier = OnnxClassifier(onnx_path)
    net = _export_copy(model)
    per_scale: dict[str, dict[str, float]] = {}
    count = 0
    for scale in checked:
        batch = eval_batch(images, scale)
        count = int(batch.shape[0])
        reference = net(normalize_nhwc_uint8(batch, channels_last=False)).float().numpy()
        candidate = classifier.predict(batch)
        if candidate.shape != reference.shape:
            raise OnnxInputError(f"{classifier.path}: returns logits shaped {list(candidate.shape)} at {scale} px, "
                                 f"the model {list(reference.shape)}")
        diff = float(np.max(np.abs(candidate - reference)))
        per_scale[str(scale)] = {"max_abs_diff": diff, "agreement": _agreement(reference, candidate)}
        if not diff <= tolerance:  # also catches NaN
            raise OnnxMismatchError(path=classifier.path, scale=scale, max_abs_diff=diff, tolerance=tolerance)
    return {
        "file": str(classifier.path), "input_layout": classifier.input_layout, "tolerance": tolerance,
        "num_images": count, "max_abs_diff": max(v["max_abs_diff"] for v in per_scale.values()),
        "agreement": min(v["agreement"] for v in per_scale.values()), "scales": per_scale,
    }
