"""``msdali plot``: PNG figures of a run directory."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the PNGs. Default: RUN_DIR/plots.")
def plot(run_dir: str, out_dir: str | None) -> None:
    """PNG figures of a run: loss/accuracy per scale, the scale schedule, the evaluation sweep (eval.json)."""
    from multiscale_dali.reporting.plot import plot_run

    for path in plot_run(run_dir, out_dir=out_dir):
        click.echo(f"wrote {path}")
