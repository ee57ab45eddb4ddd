"""``msdali benchmark``: loader and training throughput of every backend side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from multiscale_dali.cli.options import device_option
from multiscale_dali.cli.params import COUNTS, SCALES
from multiscale_dali.errors import UserError


def _is_pack(data: Path | None) -> bool:
    from multiscale_dali.data.packed import is_packed_dir

    return data is not None and is_packed_dir(data)


def _shard_benchmark(pack: Path, compare_folder: Path | None, *, backends: str, json_out: Path | None,
                     **options: Any) -> None:
    """A pack against the same images as files (``benchmark.shards``)."""
    from multiscale_dali.benchmark.report import save_results
    from multiscale_dali.benchmark.shards import format_shard_report, run_shard_benchmark

    try:
        results = run_shard_benchmark(pack=pack, compare_folder=compare_folder,
                                      backends=tuple(b.strip() for b in backends.split(",") if b.strip()), **options)
    except UserError:
        raise
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(format_shard_report(results))
    if json_out is not None:
        save_results(results, json_out)
        click.echo(f"results written to {json_out}")


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="ImageFolder to read (its train/ split if it has one), or a packed directory: then its train "
                   "split is measured against the same images as files. Default: the embedded texture photos.")
@click.option("--compare-folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --data SHARDS: the folder the pack was made from, when it is not where the manifest says.")
@click.option("--synthetic", type=click.IntRange(min=1), default=None,
              help="Use N generated photo-like 500x375 JPEGs (cached) instead of --data.")
@click.option("--scales", type=SCALES, default="64,96,128", show_default=True,
              help="Comma-separated increasing scales.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size.")
@click.option("--backends", default="dali,torchvision,baseline", show_default=True,
              help="Comma-separated from dali, torchvision, baseline, dali-1scale (dali brings dali-1scale).")
@click.option("--model", default="tiny_cnn", show_default=True,
              help="Model of the training-step and memory sections (see `msdali models`); 'none' skips them.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed batches per trial.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed batches after the first one.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds, each a fresh loader per case; the median is reported with min and max.")
@device_option
@click.option("--workers", type=COUNTS, default=None,
              help="DataLoader worker counts to sweep, e.g. 0,1,2. "
                   "Default: 0..2 on CPU, powers of two up to the cores on GPU.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full results (with the machine description) as JSON to this file.")
def benchmark(data: Path | None, compare_folder: Path | None, synthetic: int | None, scales: tuple[int, ...], batch_size: int, backends: str,
              model: str, iters: int, warmup: int, repeats: int, device: str, workers: tuple[int, ...] | None,
              json_out: Path | None) -> None:
    """Loader and training throughput of every backend side by side, step memory, and the goals.

    See docs/benchmarks.md for what each number means and the figures we measured.
    """
    from multiscale_dali.benchmark.core import format_report, run_benchmark, save_results
    from multiscale_dali.models.input_size import check_model_scales

    if data is not None and synthetic is not None:
        raise click.UsageError("--data and --synthetic are mutually exclusive")
    if _is_pack(data):
        _shard_benchmark(data, compare_folder, scales=scales, batch_size=batch_size, backends=backends, iters=iters,
                         warmup=warmup, repeats=repeats, device=device, workers=workers, json_out=json_out)
        return
    if compare_folder is not None:
        raise click.UsageError("--compare-folder needs --data SHARDS, a packed directory")
    chosen_model = None if model.lower() == "none" else model
    if chosen_model is not None:  # one output: the head's width does not change the sizes a model accepts
        check_model_scales(chosen_model, scales, num_outputs=1)
    try:
        results = run_benchmark(
            data=data, scales=scales, batch_size=batch_size,
            backends=tuple(b.strip() for b in backends.split(",") if b.strip()), model=chosen_model, iters=iters,
            device=device, workers=workers, warmup=warmup, repeats=repeats, synthetic=synthetic,
        )
    except UserError:
        raise  # translated by the command group, with its flag
    except ValueError as err:  # run_benchmark's own argument checks (backend names, an empty folder)
        raise click.UsageError(str(err)) from None
    click.echo(format_report(results))
    if json_out is not None:
        save_results(results, json_out)
        click.echo(f"results written to {json_out}")
