"""Tiny trained runs for the deployment tests (export, predict, finetune-res, TTA, timm): an ImageFolder
with train/val/test in tmp_path and one short CPU run on it, built in-process."""

from __future__ import annotations

from pathlib import Path

from conftest import make_jpeg_folder
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.run import run_training

SCALES = (32, 48)


def make_split_folder(root: Path, *, classes: int = 3) -> Path:
    """train 8 / val 2 / test 3 JPEGs per class, mixed sizes and aspect ratios."""
    for split, per_class in (("train", 8), ("val", 2), ("test", 3)):
        make_jpeg_folder(root / split, classes=classes, per_class=per_class)
    return root


def train_tiny_run(data: Path, out: Path, *, model: str = "tiny_cnn", scales: tuple[int, ...] = SCALES,
                   epochs: int = 1, scale_norm: str = "") -> Path:
    """One short run on the CPU with the torchvision backend; returns its best.pt."""
    run_training(TrainConfig(data=str(data), out=str(out), epochs=epochs, scales=scales, batch_size=8, model=model,
                             backend="torchvision", workers=0, device="cpu", lr=1e-2, scan=False,
                             scale_norm=scale_norm))
    return out / "best.pt"


def untrained_run(data: Path, out: Path, *, model: str, scales: tuple[int, ...] = SCALES, classes: int = 3) -> Path:
    """A run directory whose best.pt holds freshly initialised weights of ``model``: what evaluate, export,
    predict and finetune-res read, without the cost of training (for bad-input and model-family tests)."""
    import torch

    from multiscale_dali.pipelines.schedule import constant_schedule
    from multiscale_dali.training.losses import num_outputs, resolve_task
    from multiscale_dali.training.run_files import RunFiles
    from multiscale_dali.training.run_setup import bare_network

    task = resolve_task(classes, "auto")
    config = TrainConfig(data=str(data), out=str(out), scales=scales, model=model, batch_size=8,
                         backend="torchvision", workers=0, device="cpu", scan=False)
    torch.manual_seed(0)
    net = bare_network(config, num_outputs=num_outputs(task, classes), pretrained=False)  # as a run builds it
    files = RunFiles(out, is_main=True, common={
        "config": config.to_dict(), "resolved": {"data": str(data)}, "task": task,
        "classes": [f"class_{k}" for k in range(classes)], "schedule": constant_schedule(scales).to_dict()})
    files.write_config(dataset={})
    files.save_best(net, epoch=0)
    return out / "best.pt"
