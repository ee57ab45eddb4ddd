"""Checkpoints that survive a kill at any moment and load with ``torch.load(weights_only=True)``.

Only plain dicts, lists, numbers, strings and tensors go in: ``weights_only`` loading then refuses
anything that would run code, so a tampered checkpoint cannot execute a pickle payload.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from multiscale_dali.errors import UserError

log = logging.getLogger(__name__)


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


def load_scaler_state(scaler: torch.amp.GradScaler, state: Mapping[str, Any] | None) -> None:
    """Restore a checkpoint's GradScaler entry, AMP switched on or off since (a GPU run resumed on a CPU).

    A disabled GradScaler saves ``{}``, and loading ``{}`` into an enabled one raises: trainers store
    the state only when fp16 scaling is in use, and this handles both directions.
    """
    if scaler.is_enabled():
        if state is not None:
            scaler.load_state_dict(state)
        else:
            log.warning("checkpoint was saved without fp16 loss scaling; starting a fresh GradScaler")
    elif state is not None:
        log.info("checkpoint has a GradScaler state; not needed without fp16, ignored")
