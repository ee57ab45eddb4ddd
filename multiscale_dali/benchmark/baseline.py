"""The seed project's loader ("baseline"): one full open + decode + transform per scale, behind the
same :class:`~multiscale_dali.pipelines.spec.Loader` protocol as the decode-once backends."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from multiscale_dali.benchmark.config import BASELINE
from multiscale_dali.constants import IMAGENET_MEAN, IMAGENET_STD
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.pipelines.spec import LoaderSpec


def open_rgb(path: str) -> Image.Image:
    """Open and decode ``path`` as RGB with PIL; the baseline calls it once per scale (module-level so
    tests can count the calls)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _baseline_transform(scale: int, spec: LoaderSpec) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    # The seed normalised in the 0..1 range after ToTensor; our constants are in pixel units.
    return T.Compose([
        T.RandomResizedCrop(scale, scale=spec.crop_area, ratio=spec.crop_aspect),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ])


class BaselineDataset(Dataset):
    """``(tuple of float [3, s, s] per scale, label)``; every scale re-opens and re-decodes the file."""

    def __init__(self, spec: LoaderSpec, scales: Sequence[int]) -> None:
        self.files = spec.files
        self.labels = spec.labels
        self.scales = tuple(scales)
        self.transforms = [_baseline_transform(s, spec) for s in self.scales]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int]:
        # Deliberately no sharing between scales: this is the cost the decode-once backends remove.
        images = tuple(transform(open_rgb(self.files[index])) for transform in self.transforms)
        return images, int(self.labels[index])


class BaselineLoader:
    """The seed-style loader behind the :class:`~multiscale_dali.pipelines.spec.Loader` protocol.

    Constant schedules only and no sharding (the benchmark runs one process). Given the same
    ``persistent_workers`` and pinned memory as the torchvision backend, so only the per-sample work
    differs.
    """

    backend = BASELINE

    def __init__(self, spec: LoaderSpec) -> None:
        if not spec.schedule.is_constant or spec.num_shards != 1:
            raise ValueError("the baseline loader supports one constant schedule on one shard")
        self.spec = spec
        self._device = torch.device(spec.device)
        self._scales = spec.schedule.final_scales
        self._generator = torch.Generator()
        self._loader: DataLoader | None = DataLoader(
            BaselineDataset(spec, self._scales),
            batch_size=spec.batch_size,
            shuffle=spec.train,
            generator=self._generator,
            num_workers=spec.num_workers,
            pin_memory=self._device.type == "cuda",
            drop_last=spec.drop_last and len(spec.files) >= spec.batch_size,
            persistent_workers=spec.num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self._loader) if self._loader is not None else 0

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        if self._loader is None:
            raise RuntimeError("this BaselineLoader is closed")
        self._generator.manual_seed(self.spec.seed + epoch)
        return self._batches(iter(self._loader))

    def close(self) -> None:
        self._loader = None

    def _batches(self, batches: Iterable) -> Iterator[MultiScaleBatch]:
        non_blocking = self._device.type == "cuda"
        for images, labels in batches:
            moved = {s: t.to(self._device, non_blocking=non_blocking) for s, t in zip(self._scales, images)}
            yield MultiScaleBatch(images=moved, labels=labels.to(self._device, non_blocking=non_blocking))
