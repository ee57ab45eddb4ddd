"""Where a run keeps its checkpoints, what goes into them, and how a resume finds a good one."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiscale_dali.training.checkpoint import CheckpointError, load_checkpoint
from multiscale_dali.fileio import atomic_save

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


def last_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def best_path(run_dir: Path) -> Path:
    return Path(run_dir) / BEST


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (``RUN/checkpoints/last.pt`` -> ``RUN``)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def save_last(payload: dict[str, Any], run_dir: Path) -> Path:
    """Keep the previous good checkpoint beside the new one, then write the new one atomically.

    Atomic writes already make a torn ``last.pt`` impossible from our side; ``previous.pt`` covers
    what we cannot control (a file damaged later, a copy cut short), so a resume falls back one
    checkpoint instead of starting from scratch.
    """
    last = last_path(run_dir)
    if last.exists():
        os.replace(last, last.parent / PREVIOUS)
    return atomic_save(payload | {"format": FORMAT_VERSION}, last)


def find_resume_checkpoint(resume: str, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``auto``: the run's last checkpoint, else its previous one, else None (fresh start).

    An explicit path must load. A damaged last checkpoint is reported and the previous used; when
    neither loads, resuming fails loudly rather than silently training from scratch.
    """
    if resume != "auto":
        path = Path(resume)
        payload = load_checkpoint(path)
        if "trainer" not in payload:
            raise CheckpointError(
                f"{path} holds a model only (best.pt), not a training state; resume from "
                f"{last_path(run_dir_of(path))}"
            )
        return path, payload
    candidates = [last_path(run_dir), last_path(run_dir).parent / PREVIOUS]
    existing = [p for p in candidates if p.exists()]
    if not existing:
        return None
    errors = []
    for path in existing:
        try:
            payload = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; trying an older checkpoint", err)
            errors.append(str(err))
            continue
        if errors:
            log.warning("resuming from the previous checkpoint %s", path)
        return path, payload
    raise CheckpointError("no loadable checkpoint in " + str(last_path(run_dir).parent) + ": " + "; ".join(errors))


def capture_rng_state() -> dict[str, Any]:
    """RNG states as ints and tensors: ``weights_only`` loading refuses NumPy's state tuple."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
