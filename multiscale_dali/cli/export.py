"""``msdali export``: a checkpoint to ONNX, verified against PyTorch with onnxruntime on the run's images."""

from __future__ import annotations

from pathlib import Path

import click

from multiscale_dali.cli.options import checkpoint_option
from multiscale_dali.cli.params import SCALES
from multiscale_dali.constants import ONNX_TOLERANCE, ONNX_VERIFY_IMAGES


def _scales(scale: int | None, scales: tuple[int, ...] | None, checkpoint: str) -> tuple[int, ...]:
    """--scale and --scales together: every scale named; neither: the scale predict would use."""
    chosen = tuple(sorted({*(scales or ()), *(() if scale is None else (scale,))}))
    if chosen:
        return chosen
    from multiscale_dali.evaluation.evaluate import default_predict_scales, load_model

    return default_predict_scales(load_model(checkpoint, device="cpu"))


@click.command()
@checkpoint_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write (*.onnx).")
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="The resolution to export for. Default: the largest scale the model was trained at last.")
@click.option("--scales", type=SCALES, default=None,
              help="Several resolutions (with --dynamic): the file serves, and is verified at, each of them.")
@click.option("--dynamic", is_flag=True,
              help="Dynamic height and width (one file for every scale); default: fixed at the one scale.")
@click.option("--with-preprocessing", is_flag=True,
              help="uint8 NHWC RGB input, the pipelines' normalisation inside the graph; default: normalised "
                   "float NCHW.")
@click.option("--tolerance", type=float, default=ONNX_TOLERANCE, show_default=True,
              help="Largest |ONNX - PyTorch| logit difference accepted.")
@click.option("--verify-images", type=int, default=ONNX_VERIFY_IMAGES, show_default=True,
              help="Images of the run's test split the check runs on.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="ImageFolder root for the check. Default: the dataset the run trained on.")
def export(checkpoint: str, out: str, scale: int | None, scales: tuple[int, ...] | None, dynamic: bool,
           with_preprocessing: bool, tolerance: float, verify_images: int, data: str | None) -> None:
    """Export a checkpoint to ONNX, run it in onnxruntime on real images at each scale and compare with PyTorch.

    Writes OUT and OUT's stem + .verify.json; a logit difference beyond --tolerance is an error.
    Needs the export extra: pip install 'multiscale-dali[export]'.
    """
    from multiscale_dali.evaluation.export_checkpoint import ExportOptions, export_checkpoint, verification_path

    options = ExportOptions(scales=_scales(scale, scales, checkpoint), out=Path(out), dynamic=dynamic,
                            with_preprocessing=with_preprocessing, data=data, tolerance=tolerance,
                            verify_images=verify_images)
    report = export_checkpoint(checkpoint, options=options)
    layout = "uint8 NHWC (preprocessing inside)" if with_preprocessing else "normalised float NCHW"
    click.echo(f"wrote {out}: {layout} input, {'dynamic' if dynamic else 'fixed'} shape, "
               f"{len(report['classes'])} classes ({report['task']})")
    click.echo(f"onnxruntime vs PyTorch on {report['num_images']} {report['split']} images "
               f"(tolerance {report['tolerance']:g}):")
    for key, figures in report["scales"].items():
        click.echo(f"  {key}px: max |logit diff| {figures['max_abs_diff']:.2e}, "
                   f"same class {figures['agreement']:.1%}")
    click.echo(f"wrote {verification_path(Path(out))}")
