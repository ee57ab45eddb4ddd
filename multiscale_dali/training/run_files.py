"""What a run writes into its directory: config.json, metrics.jsonl, best.pt, the training checkpoints
and results.json. Only rank 0 writes; on the other ranks every method does nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from multiscale_dali.constants import CONFIG_FILE, METRICS_FILE, RESULTS_FILE, SPLITS_FILE
from multiscale_dali.fileio import atomic_save
from multiscale_dali.training.records import EpochRecord
from multiscale_dali.training.resume import best_path, save_last
from multiscale_dali.training.run_directory import append_json_line, keep_metrics_before, write_json


class RunFiles:
    """The run directory's writer. ``common``: what config.json, best.pt and every checkpoint share
    (configuration, resolved settings, classes, task, schedule)."""

    def __init__(self, out_dir: Path, *, is_main: bool, common: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self._common = dict(common)

    def write_config(self, *, dataset: Mapping[str, Any]) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / CONFIG_FILE, self._common | {
                "dataset": dataset, "argv": sys.argv, "versions": library_versions()})

    def write_splits(self, record: Mapping[str, Any]) -> None:
        """splits.json: the held-out files, so a later evaluate measures the very same ones."""
        if self.is_main:
            write_json(self.out_dir / SPLITS_FILE, dict(record))

    def append_epoch(self, record: EpochRecord, *, mode: str, backend: str) -> None:
        if self.is_main:
            append_json_line(self.out_dir / METRICS_FILE, {"mode": mode, "backend": backend} | record.to_json())

    def keep_metrics_before(self, epoch: int) -> None:
        """A resumed run trains ``epoch`` and later again: their lines move aside."""
        if self.is_main:
            keep_metrics_before(self.out_dir / METRICS_FILE, epoch)

    def save_best(self, net: nn.Module, *, epoch: int | None, val: Mapping[int, Any] | None = None) -> None:
        if self.is_main:
            atomic_save(self._common | {"model": net.state_dict(), "epoch": epoch,
                                        "val": {str(s): m for s, m in (val or {}).items()}},
                        best_path(self.out_dir))

    def carry_best(self, best: Mapping[str, Any]) -> None:
        """Another run directory's ``best.pt``, copied as it is: a run continued elsewhere carries it along."""
        if self.is_main:
            atomic_save(dict(best), best_path(self.out_dir))

    def save_training_state(self, trainer_state: Mapping[str, Any], ranks: list[Mapping[str, Any]]) -> None:
        """The checkpoint: the trainer's state and, per rank, its loader position, RNG state and step."""
        if self.is_main:
            save_last(self._common | {
                "trainer": trainer_state, "loaders": [r["loader"] for r in ranks], "rngs": [r["rng"] for r in ranks],
                "rank_steps": [r["global_step"] for r in ranks], "world_size": len(ranks)},
                self.out_dir)

    def write_results(self, results: Mapping[str, Any]) -> None:
        if self.is_main:
            write_json(self.out_dir / RESULTS_FILE, dict(results))


def library_versions() -> dict[str, str | None]:
    """Versions that decide numerics and speed, written into every run directory."""
    import PIL
    import torchvision

    from multiscale_dali import __version__
    from multiscale_dali.pipelines.factory import dali_version

    return {
        "msdali": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "dali": dali_version(), "pillow": PIL.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
