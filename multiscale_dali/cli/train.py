"""``msdali train``: flags and recipe -> a checked configuration -> a run, reported as it goes."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import click

from multiscale_dali.cli.options import TRAIN_FIELDS, train_options
from multiscale_dali.cli.progress import check_extras, train_reporter
from multiscale_dali.constants import EXIT_INTERRUPTED, EXIT_REQUEUE
from multiscale_dali.errors import ConfigError
from multiscale_dali.training.config import TrainConfig, config_from_checkpoint, config_from_mapping, recipe_config


def build_train_config(
    config_path: str | None, flags: dict[str, Any], *, resumed: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults < recipe < flags. Resuming without a recipe starts from the checkpoint's configuration;
    with one (a relaunch script that always passes the same --config), the recipe and flags must agree
    with the checkpoint, which the run checks.

    Raises ConfigError naming the flag; a bad value that comes from the recipe says so.
    """
    given = {field: flags[field] for field in TRAIN_FIELDS if flags.get(field) is not None}
    try:
        if config_path:
            base = recipe_config(config_path)
        elif resumed is not None:
            base = config_from_checkpoint(resumed, source="the checkpoint")
        else:
            base = TrainConfig()
        if "out" not in given:
            if resumed is not None:
                given["out"] = resumed["out"]
            elif config_path is None or base.out == TrainConfig().out:
                given["out"] = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
        return config_from_mapping(given, base=base, source="command line")
    except ConfigError as err:
        if err.key in given or err.key == "config" or not config_path:
            raise
        raise ConfigError(err.key, f"{err.message} (the value comes from {config_path}; "
                                   "override it on the command line)") from None


def _resumed_config(resume: str | None, out: str | None) -> dict[str, Any] | None:
    """The configuration stored in the checkpoint a resume will use (None: fresh run)."""
    from multiscale_dali.training.resume import find_resume_checkpoint, run_dir_of

    if resume is None:
        return None
    if resume == "auto" and out is None:
        raise click.UsageError("--resume auto: give the run directory to continue with --out")
    found = find_resume_checkpoint(resume, Path(out or "."))
    if found is None:
        return None
    # Without --out, a checkpoint file continues in its own run directory, wherever it was moved.
    config = found[1]["config"] | {"out": str(run_dir_of(found[0]))}
    recorded_data = found[1].get("resolved", {}).get("data")
    if config.get("data") is not None and recorded_data:
        # The absolute path the run read: the flag's spelling may be relative to another directory.
        config["data"] = recorded_data
    return config


def check_run_scales(config: TrainConfig) -> None:
    """Refuse, before any data is read, a model that cannot run at one of the scales the run visits."""
    from multiscale_dali.models.input_size import check_model_scales, check_train_batch
    from multiscale_dali.training.run import build_schedule

    # The head's width does not change which input sizes the network accepts, and the class count
    # is known only once the data is read: one output stands in for it.
    scales = build_schedule(config).all_scales
    check_model_scales(config.model, scales, num_outputs=1)
    check_train_batch(config.model, scales, batch_size=config.batch_size, num_outputs=1)


def _report(result: Any, config: TrainConfig, *, plot: bool, echo: Callable[..., None]) -> None:
    """The end of a run: why it stopped early, or its test results and where to look next."""
    if result.interrupted:
        why = f"{result.stop_signal} (requeue signal)" if result.requeue else result.stop_signal
        during = " during the final test pass (training is done)" if result.test_pending else ""
        echo(f"stopped by {why}{during}; checkpoint saved. Continue with: "
             f"msdali train --out {config.out} --resume auto")
        sys.exit(EXIT_REQUEUE if result.requeue else EXIT_INTERRUPTED)
    best = None if result.best_epoch is None else result.best_epoch + 1
    echo(f"backend {result.backend} on {result.device}; best epoch {best}")
    for scale, metrics in result.test.items():
        echo(f"test {scale}px: loss {metrics['loss']:.4f} accuracy {metrics['accuracy']:.1%}")
    if plot and result.rank == 0:
        from multiscale_dali.reporting.plot import plot_run

        for path in plot_run(config.out):
            echo(f"wrote {path}")
    echo(f"next: msdali evaluate --checkpoint {config.out}/best.pt --recalibrate-bn   |   msdali plot {config.out}")


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Recipe: a bundled name (see `msdali recipes`) or a TOML file; flags override its values.")
@click.option("--resume", default=None, metavar="auto|PATH",
              help="Continue a run: auto = the checkpoint in --out (fresh start if none), or a checkpoint file.")
@click.option("--plot", "plot_at_end", is_flag=True,
              help="Write PNG figures to RUN_DIR/plots at the end (needs the plot extra).")
@click.option("--tensorboard", is_flag=True,
              help="Also log per-epoch metrics to RUN_DIR/tensorboard (needs the tensorboard extra).")
@click.option("--requeue-signal", default=None, metavar="SIGNAL|none",
              help="Checkpoint at the next step and exit 75 on this signal (a scheduler's time-limit warning). "
                   "Default: SIGUSR1 inside a SLURM job (SLURM_JOB_ID set), none outside.")
@train_options
def train(config_path: str | None, resume: str | None, plot_at_end: bool, tensorboard: bool,
          requeue_signal: str | None, **flags: Any) -> None:
    """Train a classifier; writes metrics.jsonl, config.json, results.json and best.pt to --out.

    SIGTERM/SIGINT (and the --requeue-signal) stop at the next step with a checkpoint and exit code 75;
    --resume auto continues.
    """
    from multiscale_dali.training.run import run_training
    from multiscale_dali.training.signals import StartupInterrupted, StopRequest, resolve_requeue_signal

    # Under torchrun every rank runs this command; only rank 0 talks (and writes, see training/run.py).
    echo = click.echo if os.environ.get("RANK", "0") == "0" else (lambda *_a, **_k: None)
    try:
        with StopRequest(immediate=True):  # checking the flags and the model: nothing to save yet
            resumed = _resumed_config(resume, flags.get("out"))
            config = build_train_config(config_path, flags, resumed=resumed)
            check_run_scales(config)
            check_extras(tensorboard=tensorboard, plot=plot_at_end)
            requeue = resolve_requeue_signal(requeue_signal)
        echo(f"run directory: {config.out}")
        with train_reporter(epochs=config.epochs, out=config.out, tensorboard=tensorboard) as reporter:
            result = run_training(config, resume=resume, on_epoch_end=reporter.epoch_end, on_step=reporter.step,
                                  requeue_signal=requeue)
    except StartupInterrupted as stopped:
        echo(f"{stopped}; nothing to resume from yet: run the same command again")
        sys.exit(EXIT_INTERRUPTED)
    _report(result, config, plot=plot_at_end, echo=echo)
