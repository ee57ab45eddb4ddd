"""A trained network rebuilt from a run's checkpoint, for evaluation and prediction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multiscale_dali.pipelines.schedule import ScaleSchedule
from multiscale_dali.training.checkpoint import CheckpointError, load_checkpoint
from multiscale_dali.training.config import ConfigError, TrainConfig, config_from_checkpoint
from multiscale_dali.training.losses import num_outputs
from multiscale_dali.training.resume import run_dir_of
from multiscale_dali.training.run_setup import bare_network


@dataclass(frozen=True)
class LoadedModel:
    """A rebuilt network (eval mode, on its device) and what its checkpoint says about it."""

    model: nn.Module
    path: Path
    config: TrainConfig
    task: str
    classes: tuple[str, ...]
    schedule: ScaleSchedule
    resolved: dict[str, Any]
    epoch: int | None
    device: torch.device

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)


def _first_problem(err: RuntimeError) -> str:
    """The first concrete line of load_state_dict's multi-line message (a missing key, a size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    return detail if len(detail) <= 200 else detail[:200] + "..."


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of ``best.pt`` or of a training checkpoint (``last.pt``).

    Raises :class:`ConfigError` naming ``--checkpoint`` when the file is missing, unreadable or
    lacks what a rebuild needs.
    """
    path = Path(path)
    try:
        payload = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise ConfigError("checkpoint", str(err)) from None
    # best.pt holds the weights at the top; last.pt nests them in the trainer state.
    state = payload.get("model") if "model" in payload else payload.get("trainer", {}).get("model")
    missing = [key for key in ("config", "classes", "task", "schedule") if key not in payload]
    if state is None or missing:
        raise ConfigError("checkpoint", f"{path} lacks {', '.join(missing) or 'model weights'}: not a run checkpoint")
    config = config_from_checkpoint(payload["config"], source=f"the checkpoint {path}")
    classes = tuple(payload["classes"])
    task = payload["task"]
    outputs = num_outputs(task, len(classes))
    model = bare_network(config, num_outputs=outputs, pretrained=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # another model's weights, or a head for another task or class count
        raise ConfigError("checkpoint", f"{path}: its weights do not fit {config.model} with {outputs} output(s) "
                                        f"for the {task} task of {len(classes)} classes ({_first_problem(err)})"
                          ) from None
    device = torch.device(device)
    model = model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    model.eval()
    epoch = payload.get("epoch")
    if epoch is None and "trainer" in payload:
        epoch = int(payload["trainer"]["epoch"]) - 1  # the trainer stores the next epoch to run
    return LoadedModel(
        model=model, path=path, config=config, task=task, classes=classes,
        schedule=ScaleSchedule.from_dict(payload["schedule"]), resolved=dict(payload.get("resolved", {})),
        epoch=epoch, device=device,
    )
