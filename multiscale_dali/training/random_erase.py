"""Random erasing on the device: one box per sample, drawn in relative coordinates, at every scale.

torchvision's and timm's ``RandomErasing`` with their defaults (erased area 2-33% of the image, aspect
ratio log-uniform in [0.3, 1/0.3], up to 10 attempts to fit the box) on the normalised tensors, the
way torchvision's classification recipe uses it (after ``Normalize``, filled with 0, which is the
mean colour there). What is specific to multi-scale training: the box is drawn **once** per sample
as fractions of the image and scaled to each resolution, so every scale of a sample loses the same
region and the scale-consistency term compares the same image. A constant fill (rather than timm's
per-pixel noise) is what makes the erased images of two scales the same picture.

:func:`draw_erase` is a function of a CPU ``torch.Generator`` only (fixed consumption per batch, no
device sync); :func:`erase_images` and :func:`apply_erase` are pure (the inputs are not modified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from multiscale_dali.pipelines.batch import MultiScaleBatch

# torchvision.transforms.RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3)); timm's are the same.
ERASE_AREA: tuple[float, float] = (0.02, 1 / 3)
ERASE_ASPECT: tuple[float, float] = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10
# The erased pixels' value on the normalised tensors: the dataset mean (torchvision's value=0).
ERASE_FILL = 0.0


@dataclass(frozen=True)
class EraseDraw:
    """One batch's boxes: float64 ``[B, 4]`` rows ``(top, bottom, left, right)`` as fractions of the image.

    ``erased`` (bool ``[B]``) says which samples lose their box; the others' rows are zeros.
    """

    boxes: torch.Tensor
    erased: torch.Tensor

    @property
    def any(self) -> bool:
        return bool(self.erased.any())

    def pixel_boxes(self, height: int, width: int) -> torch.Tensor:
        """int64 ``[B, 4]`` ``(y0, y1, x0, x1)``, half-open, at one resolution; rounded half up."""
        scale = torch.tensor([height, height, width, width], dtype=torch.float64)
        return torch.floor(self.boxes * scale + 0.5).long()


def draw_erase(prob: float, batch_size: int, generator: torch.Generator) -> EraseDraw:
    """Each sample erased with probability ``prob``, its box from the first of 10 attempts that fits.

    Always consumes the same number of values from ``generator`` (so equal states give equal draws,
    and the stream does not depend on the outcomes).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"random erase probability must be in [0, 1], got {prob}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = (batch_size, ERASE_ATTEMPTS)
    coin = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    area = torch.empty(shape, dtype=torch.float64).uniform_(*ERASE_AREA, generator=generator)
    log_aspect = torch.empty(shape, dtype=torch.float64).uniform_(
        math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]), generator=generator)
    position = torch.rand((*shape, 2), generator=generator, dtype=torch.float64)
    height, width = (area * log_aspect.exp()).sqrt(), (area / log_aspect.exp()).sqrt()
    fits = (height < 1) & (width < 1)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    height, width = height.gather(1, first)[:, 0], width.gather(1, first)[:, 0]
    top = position[..., 0].gather(1, first)[:, 0] * (1 - height)
    left = position[..., 1].gather(1, first)[:, 0] * (1 - width)
    erased = (coin < prob) & fits.any(dim=1)
    boxes = torch.stack((top, top + height, left, left + width), dim=1) * erased.unsqueeze(1)
    return EraseDraw(boxes=boxes, erased=erased)


def erase_images(images: torch.Tensor, draw: EraseDraw) -> torch.Tensor:
    """``images`` (float ``[B, C, H, W]``) with each erased sample's box set to :data:`ERASE_FILL`."""
    if images.ndim != 4 or images.shape[0] != draw.boxes.shape[0]:
        raise ValueError(f"expected images [{draw.boxes.shape[0]}, C, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    y0, y1, x0, x1 = draw.pixel_boxes(height, width).to(images.device, non_blocking=True).unbind(1)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
              & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1)))
    # clone() keeps channels_last (an out-of-place masked_fill with a broadcast mask would not).
    return images.clone().masked_fill_(inside.unsqueeze(1), ERASE_FILL)


def apply_erase(draw: EraseDraw, batch: MultiScaleBatch) -> MultiScaleBatch:
    """Every scale of ``batch`` erased with the same relative boxes; the batch itself when none is erased."""
    if not draw.any:
        return batch
    images = {scale: erase_images(x, draw) for scale, x in batch.images.items()}
    return MultiScaleBatch(images=images, labels=batch.labels, valid=batch.valid)
