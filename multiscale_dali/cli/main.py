"""``msdali``: the command group, its logging set-up, and the one place user errors become messages.

Each command lives in a module of its own (train, evaluate, predict, export, finetune-res, scan,
pack, benchmark, plot, models, recipes); this module only registers them. ``multiscale_dali.cli.main:main`` is the entry point.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from multiscale_dali.cli.benchmark import benchmark
from multiscale_dali.cli.evaluate import evaluate
from multiscale_dali.cli.export import export
from multiscale_dali.cli.finetune_res import finetune_res
from multiscale_dali.cli.models import models
from multiscale_dali.cli.pack import pack
from multiscale_dali.cli.plot import plot
from multiscale_dali.cli.predict import predict
from multiscale_dali.cli.recipes import recipes
from multiscale_dali.cli.scan import scan
from multiscale_dali.cli.train import train
from multiscale_dali.errors import EXIT_FAILURE, OutOfMemoryError, UserError, out_of_memory_reason

log = logging.getLogger(__name__)


class UserErrorExit(click.ClickException):
    """A :class:`UserError` as click shows it: ``Error: FLAG: message`` (one line, plus a hint) and its exit code."""

    def __init__(self, err: UserError) -> None:
        super().__init__(err.user_message())
        self.exit_code = err.exit_code


def _os_error_message(err: OSError) -> str:
    where = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return f"{err.strerror or err}: {where}" if where else str(err.strerror or err)


class MsdaliGroup(click.Group):
    """The command group; it turns the library's user errors into messages, for every command at once."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as err:
            raise UserErrorExit(err) from None
        except click.exceptions.Exit:  # --help and ctx.exit(): a RuntimeError, but no failure
            raise
        except (RuntimeError, MemoryError) as err:
            reason = out_of_memory_reason(err)
            if reason is None:
                raise
            log.debug("out of memory", exc_info=True)
            raise UserErrorExit(OutOfMemoryError(f"out of memory: {reason}")) from None
        except OSError as err:
            # A full disk, a file removed or made unreadable under a running command: the machine's
            # state, not a bug; -vv logs the traceback.
            log.debug("I/O error", exc_info=True)
            failure = click.ClickException(_os_error_message(err))
            failure.exit_code = EXIT_FAILURE
            raise failure from None


@click.group(cls=MsdaliGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Multi-scale image classification with decode-once GPU data pipelines (DALI or torchvision)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


for _command in (train, evaluate, predict, export, finetune_res, scan, pack, benchmark, plot, models, recipes):
    main.add_command(_command)
