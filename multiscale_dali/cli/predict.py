"""``msdali predict``: the class and probability of each image, one tab-separated line per image.

``--checkpoint`` takes a run's checkpoint or an ONNX file written by ``msdali export`` (run by
onnxruntime, the export extra).
"""

from __future__ import annotations

from typing import Sequence

import click

from multiscale_dali.cli.options import device_option
from multiscale_dali.cli.params import SCALES, TTA


def _checkpoint_predictions(checkpoint: str, images: Sequence[str], scales: tuple[int, ...] | None, device: str,
                            tta: str) -> list:
    from multiscale_dali.evaluation.evaluate import default_predict_scales, load_model, predict_images
    from multiscale_dali.models.input_size import check_model_scales
    from multiscale_dali.training.distributed import resolve_device
    from multiscale_dali.training.losses import num_outputs

    loaded = load_model(checkpoint, device=resolve_device(device))
    chosen = scales or default_predict_scales(loaded)
    check_model_scales(loaded.config.model, chosen, num_outputs=num_outputs(loaded.task, len(loaded.classes)))
    return predict_images(loaded, list(images), scales=chosen, tta=tta)


def _onnx_predictions(path: str, images: Sequence[str], scales: tuple[int, ...] | None, tta: str) -> list:
    from multiscale_dali.evaluation.onnx_predict import default_onnx_scales, load_onnx_model, predict_onnx

    model = load_onnx_model(path)
    return predict_onnx(model, list(images), scales=scales or default_onnx_scales(model), tta=tta)


@click.command()
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A run's best.pt or checkpoints/last.pt, or an ONNX file from `msdali export`.")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="One resolution. Default: the largest scale the model was trained at last (ONNX: exported at).")
@click.option("--scales", type=SCALES, default=None,
              help="Several resolutions, e.g. 64,96,128: the mean of their probabilities.")
@click.option("--tta", type=TTA, default="none", show_default=True,
              help="Test-time augmentation: flip = also the mirror image, probabilities averaged.")
@device_option
def predict(checkpoint: str, images: tuple[str, ...], scale: int | None, scales: tuple[int, ...] | None,
            tta: str, device: str) -> None:
    """Class and probability of each image (tab-separated: path, class, probability)."""
    from multiscale_dali.evaluation.onnx_predict import is_onnx_file

    if scale is not None and scales:
        raise click.UsageError("--scale and --scales: give one of them")
    chosen = (scale,) if scale is not None else scales
    if is_onnx_file(checkpoint):
        predictions = _onnx_predictions(checkpoint, images, chosen, tta)
    else:
        predictions = _checkpoint_predictions(checkpoint, images, chosen, device, tta)
    for prediction in predictions:
        click.echo(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}")
