"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

Only plain dicts, lists, numbers, strings and tensors go in: ``weights_only`` loading then refuses
anything that would run code, so a tampered checkpoint cannot execute a pickle payload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from multiscale_dali.errors import UserError


class CheckpointError(UserError, RuntimeError, flag="--resume"):
    """A checkpoint that cannot be read; the message names the file."""


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; any failure is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle payload refused, wrong format ...
        raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(payload, dict) or not ({"model", "trainer"} & set(payload)):
        raise CheckpointError(f"{path} is not an msdali checkpoint (no 'model' or 'trainer' entry)")
    return payload
