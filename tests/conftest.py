"""Shared test data: tiny synthetic JPEG folders generated in ``tmp_path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from multiscale_dali.constants import IMAGENET_MEAN, IMAGENET_STD
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.pipelines.schedule import constant_schedule

DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((96, 64), (80, 120), (100, 100), (150, 90), (70, 110))


def synthetic_image(width: int, height: int, *, seed: int) -> np.ndarray:
    """A smooth, left-right asymmetric RGB image (uint8 HWC).

    Smooth on purpose: resize kernels of different libraries agree on low-frequency content, so
    comparisons measure geometry (crop, flip, scale) rather than aliasing. The horizontal ramp makes a
    flip visible.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = rng.uniform(1.0, 3.0, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [
        255 * x / max(width - 1, 1),
        127.5 + 100 * np.sin(2 * np.pi * fy * y / height + phase[1]) * np.cos(2 * np.pi * fx * x / width),
        127.5 + 100 * np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase[2]),
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def make_jpeg_folder(
    root: Path,
    *,
    classes: int = 2,
    per_class: int = 4,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    quality: int = 95,
) -> tuple[list[str], list[int]]:
    """Write ``root/class_<k>/img_<i>.jpg`` and return ``(files, labels)`` in sorted file order.

    ``sizes`` are ``(width, height)`` pairs used round-robin, so a folder mixes shapes and aspect ratios.
    """
    files: list[str] = []
    labels: list[int] = []
    for label in range(classes):
        folder = Path(root) / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            index = label * per_class + i
            width, height = sizes[index % len(sizes)]
            path = folder / f"img_{i:03d}.jpg"
            Image.fromarray(synthetic_image(width, height, seed=index)).save(path, quality=quality)
            files.append(str(path))
            labels.append(label)
    return files, labels


def make_spec(files: Sequence[str], labels: Sequence[int], **overrides: Any) -> LoaderSpec:
    """A small eval-mode spec at 32/48/64 px, batch 4; tests override what they exercise."""
    args: dict[str, Any] = dict(
        files=tuple(files), labels=tuple(labels), schedule=constant_schedule([32, 48, 64]), batch_size=4,
        train=False, num_workers=1,
    )
    args.update(overrides)
    return LoaderSpec(**args)


def run_loader(loader_cls: Callable[[LoaderSpec], Any], spec: LoaderSpec, epochs: Iterable[int]) -> list[list]:
    """Every batch of ``epochs`` from a fresh loader, which is closed afterwards."""
    loader = loader_cls(spec)
    try:
        return [list(loader.epoch(e)) for e in epochs]
    finally:
        loader.close()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Undo ``batch.normalize_nhwc_uint8``: float ``[B, 3, H, W]`` back to the pipeline's uint8 pixels.

    Exact: the float32 round trip is off by far less than half a level, so rounding recovers the byte.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).round().clamp(0, 255).to(torch.uint8).cpu()


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> tuple[list[str], list[int]]:
    """Eight JPEGs of mixed sizes in two classes."""
    return make_jpeg_folder(tmp_path / "images", classes=2, per_class=4)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the embedded dataset and scan manifests out of the user's ~/.cache during tests.

    One directory per session: the embedded dataset is materialised once and shared by tests.
    """
    cache = tmp_path_factory.getbasetemp() / "msdali-cache"
    monkeypatch.setenv("MSDALI_CACHE", str(cache))
    return cache
