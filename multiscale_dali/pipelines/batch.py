"""The one batch contract every backend yields and every trainer consumes.

A pipeline emits, per requested scale, a uint8 tensor laid out NHWC (``[B, s, s, 3]``) and a label
vector. :func:`to_model_batch` moves that to the training device and normalises it there: uint8 is a
quarter of the bytes of float32 to copy, and ``permute(0, 3, 1, 2)`` of an NHWC tensor is already a
``channels_last`` NCHW view, so the model gets its preferred layout for free.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch

from multiscale_dali.constants import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class MultiScaleBatch:
    """``images[scale]`` is float ``[B, 3, scale, scale]`` on the device; ``labels`` is int64 ``[B]``.

    ``valid`` (bool ``[B]`` on the device) is False where a sample only pads a shard: sharding repeats
    a few samples so every rank runs the same number of steps, and metrics must count each sample
    once. ``None`` means every sample is real (always so in a single process).
    """

    images: Mapping[int, torch.Tensor]
    labels: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(sorted(self.images))


@functools.lru_cache(maxsize=8)
def _channel_stats(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh torch.tensor(..., device="cuda") per call is a blocking copy
    # from pageable host memory, every scale of every step.
    return (torch.tensor(mean, device=device, dtype=torch.float32),
            1.0 / torch.tensor(std, device=device, dtype=torch.float32))


def normalize_nhwc_uint8(
    images: torch.Tensor,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    channels_last: bool = True,
) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, H, W]`` on the tensor's own device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected a uint8 tensor shaped [B, H, W, 3], got {images.dtype} {tuple(images.shape)}"
        )
    mean_t, inv_std = _channel_stats(images.device, mean, std)
    out = (images.float() - mean_t).mul_(inv_std).permute(0, 3, 1, 2)
    # The permuted view is channels_last already; contiguous() would copy it back to NCHW.
    return out if channels_last else out.contiguous()


def to_model_batch(
    images_nhwc: Mapping[int, torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
    *,
    channels_last: bool = True,
    valid: torch.Tensor | None = None,
) -> MultiScaleBatch:
    """Move one pipeline batch to ``device`` (non-blocking from pinned memory) and normalise it.

    ``valid``: the host-side padding mask of the batch (see :class:`MultiScaleBatch`); a mask with no
    padding becomes ``None`` here, on the host, so the trainer's fast path needs no device sync.
    """
    non_blocking = device.type == "cuda"
    if valid is not None:
        valid = valid.view(-1).to(torch.bool)
        if valid.shape[0] != labels.view(-1).shape[0]:
            raise ValueError(f"valid mask has {valid.shape[0]} entries for {labels.view(-1).shape[0]} labels")
        valid = None if bool(valid.all()) else valid.to(device, non_blocking=non_blocking)
    moved = {
        int(scale): normalize_nhwc_uint8(
            t.to(device, non_blocking=non_blocking), channels_last=channels_last
        )
        for scale, t in images_nhwc.items()
    }
    return MultiScaleBatch(
        images=moved, labels=labels.to(device, non_blocking=non_blocking).long().view(-1), valid=valid
    )
