"""``msdali predict``: the class and probability of each image, one tab-separated line per image."""

from __future__ import annotations

import click

from multiscale_dali.cli.options import checkpoint_option, device_option
from multiscale_dali.cli.params import SCALES


@click.command()
@checkpoint_option
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="One resolution. Default: the largest scale the model was trained at last.")
@click.option("--scales", type=SCALES, default=None,
              help="Several resolutions, e.g. 64,96,128: the mean of their probabilities.")
@device_option
def predict(checkpoint: str, images: tuple[str, ...], scale: int | None, scales: tuple[int, ...] | None,
            device: str) -> None:
    """Class and probability of each image (tab-separated: path, class, probability)."""
    from multiscale_dali.evaluation.evaluate import default_predict_scales, load_model, predict_images
    from multiscale_dali.models.input_size import check_model_scales
    from multiscale_dali.training.distributed import resolve_device
    from multiscale_dali.training.losses import num_outputs

    if scale is not None and scales:
        raise click.UsageError("--scale and --scales: give one of them")
    loaded = load_model(checkpoint, device=resolve_device(device))
    chosen = (scale,) if scale is not None else (scales or default_predict_scales(loaded))
    check_model_scales(loaded.config.model, chosen, num_outputs=num_outputs(loaded.task, len(loaded.classes)))
    for prediction in predict_images(loaded, list(images), scales=chosen):
        click.echo(f"{prediction.path}\t{prediction.label}\t{prediction.probability:.4f}")
