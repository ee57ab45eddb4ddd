"""``msdali finetune-res``: FixRes fine-tuning of BatchNorm and the classifier at a deployment resolution."""

from __future__ import annotations

import click

from multiscale_dali.cli.options import checkpoint_option, device_option
from multiscale_dali.constants import BACKENDS, FINETUNE_LR


def _figures(metrics: dict[str, float]) -> str:
    return f"accuracy {metrics['accuracy']:.1%}, loss {metrics['loss']:.4f}" if metrics else "no test split"


@click.command(name="finetune-res")
@checkpoint_option
@click.option("--scale", required=True, type=click.IntRange(min=1), help="The deployment resolution (px).")
@click.option("--epochs", type=int, default=1, show_default=True, help="Fine-tuning epochs over the train split.")
@click.option("--lr", type=float, default=FINETUNE_LR, show_default=True, help="Learning rate (the run's optimizer).")
@click.option("--batch-size", type=int, default=None, help="Batch size. Default: the run's.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="The new run directory. Default: RUN_DIR-fixres<scale> beside the checkpoint's run.")
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="ImageFolder root. Default: the dataset the run trained on (split the same way).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Data pipeline.")
@device_option
@click.option("--workers", type=int, default=2, show_default=True, help="DALI threads / loader workers.")
def finetune_res(checkpoint: str, scale: int, epochs: int, lr: float, batch_size: int | None, out: str | None,
                 data: str | None, backend: str, device: str, workers: int) -> None:
    """Fine-tune BatchNorm and the classifier at --scale with the test-time geometry (FixRes).

    The rest of the network is frozen; BatchNorm statistics are re-estimated at the scale. Writes a new
    run directory (best.pt, config.json, metrics.jsonl, results.json); `msdali evaluate --checkpoint
    OUT/best.pt` measures it at the scale. A model without BatchNorm has its classifier fine-tuned alone.
    """
    from multiscale_dali.evaluation.finetune import FinetuneOptions, finetune_resolution

    options = FinetuneOptions(scale=scale, epochs=epochs, out=out, lr=lr, batch_size=batch_size, backend=backend,
                              device=device, workers=workers, data=data)
    result = finetune_resolution(checkpoint, options=options)
    plan = result.plan
    if plan["classifier_only"]:
        click.echo(f"the model has no BatchNorm layers: fine-tuned the classifier ({plan['head']}) only "
                   f"({plan['trainable_parameters']:,} parameters)")
    else:
        click.echo(f"fine-tuned {plan['batchnorm_layers']} BatchNorm layers and the classifier ({plan['head']}) at "
                   f"{scale}px: {plan['trainable_parameters']:,} of "
                   f"{plan['trainable_parameters'] + plan['frozen_parameters']:,} parameters")
    click.echo(f"test {scale}px before: {_figures(result.before)}")
    click.echo(f"test {scale}px after:  {_figures(result.after)}")
    click.echo(f"wrote {result.out_dir}; next: msdali evaluate --checkpoint {result.out_dir}/best.pt")
