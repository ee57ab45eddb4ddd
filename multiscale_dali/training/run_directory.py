"""The files of a run directory besides checkpoints: names, and writes that never lose data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from multiscale_dali.errors import UserError
from multiscale_dali.fileio import WriteError, atomic_write_text, dumps_json
from multiscale_dali.constants import METRICS_FILE, SUPERSEDED_METRICS_FILE
from multiscale_dali.training.resume import BEST, CHECKPOINT_DIR


class RunDirectoryError(UserError, ValueError, flag="--out"):
    """The run directory already holds a run and no ``--resume`` was asked for."""


def check_fresh(out_dir: Path) -> None:
    """A fresh run never writes over another run's metrics or checkpoints."""
    taken = [name for name in (METRICS_FILE, CHECKPOINT_DIR, BEST) if (out_dir / name).exists()]
    if taken:
        raise RunDirectoryError(
            f"{out_dir} already holds a run ({', '.join(taken)}); continue it with --resume auto, "
            "or choose another --out"
        )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, dumps_json(payload, indent=2))


def append_json_line(path: Path, record: dict[str, Any]) -> None:
    # Append and fsync each epoch: a crash later never loses the epochs already written.
    line = (dumps_json(record) + "\n").encode("utf-8")
    try:
        with path.open("ab", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                handle.write(line)
                os.fsync(handle.fileno())
            except OSError:
                handle.truncate(size)  # no half line (a full disk) for the next reader to choke on
                raise
    except OSError as err:
        raise WriteError(f"cannot append to {path}: {err.strerror or err}; its earlier lines are kept") from err


def keep_metrics_before(metrics_path: Path, epoch: int) -> None:
    """On resume, epochs at or after the checkpoint are trained again: move their lines aside."""
    if not metrics_path.exists():
        return
    keep, drop = [], []
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line)["epoch"] < epoch else drop).append(line)
    if drop:
        with (metrics_path.parent / SUPERSEDED_METRICS_FILE).open("a") as handle:
            handle.write("\n".join(drop) + "\n")
        atomic_write_text(metrics_path, "".join(line + "\n" for line in keep))
