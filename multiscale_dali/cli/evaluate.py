"""``msdali evaluate``: a checkpoint's accuracy at several resolutions, as a table and eval.json."""

from __future__ import annotations

from pathlib import Path

import click

from multiscale_dali.cli.options import checkpoint_option, device_option
from multiscale_dali.cli.params import SCALES, TTA
from multiscale_dali.constants import BACKENDS


def check_checkpoint_scales(checkpoint: str, scales: tuple[int, ...]) -> None:
    """Refuse, before any data is read, scales the checkpoint's model cannot run at."""
    from multiscale_dali.evaluation.evaluate import load_model
    from multiscale_dali.models.input_size import check_model_scales
    from multiscale_dali.training.losses import num_outputs

    loaded = load_model(checkpoint, device="cpu")
    check_model_scales(loaded.config.model, scales, num_outputs=num_outputs(loaded.task, len(loaded.classes)))


@click.command()
@checkpoint_option
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="ImageFolder root. Default: the dataset the run trained on (split the same way).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Which split to measure.")
@click.option("--scales", type=SCALES, default=None,
              help="Comma-separated resolutions, e.g. 96,128,160,192. Default: the run's training scales.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Data pipeline.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Evaluation batch size.")
@device_option
@click.option("--workers", type=int, default=2, show_default=True, help="DALI threads / loader workers.")
@click.option("--recalibrate-bn", is_flag=True,
              help="Also measure each resolution with BatchNorm statistics re-estimated there from train images.")
@click.option("--bn-batches", type=int, default=50, show_default=True,
              help="Train batches (at most) that re-estimate the BatchNorm statistics.")
@click.option("--tta", type=TTA, default="none", show_default=True,
              help="Test-time augmentation: flip adds rows with the mean over each image and its mirror.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the results. Default: eval.json in the run directory.")
def evaluate(checkpoint: str, data: str | None, split: str, scales: tuple[int, ...] | None, backend: str,
             batch_size: int, device: str, workers: int, recalibrate_bn: bool, bn_batches: int, tta: str,
             json_path: str | None) -> None:
    """Accuracy, loss (and AUC for binary tasks) of a checkpoint at several resolutions, plus their ensemble."""
    from multiscale_dali.evaluation.evaluate import EvalOptions, default_eval_path, evaluate_checkpoint, format_report
    from multiscale_dali.fileio import atomic_write_text, dumps_json

    options = EvalOptions(scales=scales, split=split, data=data, backend=backend, device=device,
                          batch_size=batch_size, workers=workers, recalibrate_bn=recalibrate_bn, bn_batches=bn_batches,
                          tta=tta)
    if scales is not None:  # the run's own scales need no check: it trained at them
        check_checkpoint_scales(checkpoint, scales)
    report = evaluate_checkpoint(checkpoint, options=options)
    epoch = "" if report.epoch is None else f" (epoch {report.epoch + 1})"
    click.echo(f"{report.checkpoint}{epoch}: {report.split} split, {report.num_samples} images, {report.task}; "
               f"backend {report.backend} on {report.device}")
    for line in format_report(report):
        click.echo(line)
    out = Path(json_path) if json_path else default_eval_path(checkpoint)
    atomic_write_text(out, dumps_json(report.to_json(), indent=2) + "\n")
    click.echo(f"wrote {out}")
