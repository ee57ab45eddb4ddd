"""Files that survive a kill at any moment: write beside, fsync, rename over, fsync the directory.

Every file msdali writes that another process may read (checkpoints, manifests, results, metrics
snapshots) goes through here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from multiscale_dali.errors import EXIT_FAILURE, UserError


class WriteError(UserError, OSError, exit_code=EXIT_FAILURE):
    """A file could not be written (full disk, read-only or vanished folder); what was there is kept."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write`` into a temporary file beside ``path``, fsync, rename over it, fsync the directory.

    A reader (another rank, a resumed run after a crash) sees either the old complete file or the new
    complete file, never half of one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        # Unbuffered: a full disk then fails the write call itself as OSError; torch.save through a
        # buffer reports it as an unrelated RuntimeError ("unexpected pos").
        with os.fdopen(fd, "wb", buffering=0) as handle:
            write(handle)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {err.strerror or err}; "
                         f"{'its previous version is unchanged' if path.exists() else 'nothing was written'}") from err
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """:func:`torch.save` of ``payload`` through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text (JSON manifests, results) through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, recursively.

    A diverged run's metrics hold NaN; ``json.dumps`` would write a bare ``NaN``, which is not JSON
    (``jq``, JavaScript and many loaders refuse the whole file), so it becomes ``null``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_json` (``allow_nan=False``): always valid JSON."""
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)
