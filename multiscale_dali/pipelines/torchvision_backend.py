"""The torchvision fallback backend, with the DALI backend's semantics.

Each sample is decoded once, cropped once and flipped once; the crop is resized to the largest scale
of the epoch and every smaller scale is resized from that output (see ``spec`` for the rules).

Workers hold no state that changes between epochs: the main-process batch sampler hands each worker
``(index, epoch, scales)`` keys, and every random draw of a sample is seeded from
``(seed, epoch, index)``, so a run is reproducible whatever the number of workers and a resumed run
at epoch ``e`` sees exactly what the uninterrupted run saw.

The pure geometry and ordering helpers it shares with the DALI backend live in ``sampling``.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from multiscale_dali.constants import Backend
from multiscale_dali.pipelines.batch import MultiScaleBatch, to_model_batch
from multiscale_dali.pipelines.spec import DataReadError, LoaderSpec, worker_message
from multiscale_dali.pipelines.augment import build_tv_auto_augment
from multiscale_dali.pipelines.sampling import (
    AUGMENT_STREAM,
    AUTO_AUGMENT_STREAM,
    SHUFFLE_STREAM,
    check_loader_state,
    derived_seed,
    eval_crop_box,
    loader_state,
    padded_sample_order,
    padding_mask,
)

log = logging.getLogger(__name__)

SampleKey = tuple[int, int, tuple[int, ...]]  # (sample index, epoch, scales of that epoch)

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop and DALI's random crop generator


def shard_indices(spec: LoaderSpec, epoch: int) -> list[int]:
    """This shard's sample indices for ``epoch``: a global (seed, epoch) shuffle in train, file order in eval."""
    count = len(spec.files)
    order = None
    if spec.train:
        order = np.random.default_rng(derived_seed(spec.seed, epoch, stream=SHUFFLE_STREAM)).permutation(count)
    padded = padded_sample_order(count, spec.num_shards, order)
    start = spec.shard_id * spec.shard_size
    return [int(i) for i in padded[start : start + spec.shard_size]]


def epoch_batches(spec: LoaderSpec, epoch: int) -> list[list[SampleKey]]:
    """The batches of ``epoch`` on this shard, each a list of ``(index, epoch, scales)`` keys."""
    scales = tuple(spec.schedule.scales_at(epoch))
    keys = [(index, epoch, scales) for index in shard_indices(spec, epoch)]
    batches = [keys[i : i + spec.batch_size] for i in range(0, len(keys), spec.batch_size)]
    return batches[: spec.steps_per_epoch]  # drops the partial batch exactly when the spec does


class ScheduledBatchSampler(Sampler[list[SampleKey]]):
    """Batch sampler of one epoch at a time; like ``DistributedSampler``, ``set_epoch`` picks which.

    The epoch lives only in the main process; workers get it inside each key.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self._epoch = 0
        self._first_step = 0

    def set_epoch(self, epoch: int, *, first_step: int = 0) -> None:
        """Pick the epoch; ``first_step`` > 0 starts it at that batch (a resumed run)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= first_step <= self.spec.steps_per_epoch:
            raise ValueError(f"first_step must be in [0, {self.spec.steps_per_epoch}], got {first_step}")
        self._epoch = epoch
        self._first_step = first_step

    def __len__(self) -> int:
        return self.spec.steps_per_epoch - self._first_step

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # Computed eagerly: the DataLoader calls iter() when an epoch starts, and the batches must
        # belong to the epoch set at that moment, not whichever is set when the first batch is drawn.
        # Slicing the keys skips batches before any worker sees them: nothing skipped is decoded.
        return iter(epoch_batches(self.spec, self._epoch)[self._first_step :])


def _unwrapped(batches: Iterator) -> Iterator:
    """``batches``, with an unreadable image reported in one line, not inside a worker's traceback."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except DataReadError as err:
            raise DataReadError(worker_message(err)) from None
        yield item


def load_rgb(path: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of any image file, EXIF orientation applied (as DALI's decoder does)."""
    try:
        image = decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        log.debug("torchvision cannot decode %s (%s); trying PIL", path, err)
        return _load_rgb_pil(path)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _load_rgb_pil(path: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            # Pillow only warns up to twice its pixel cap; an image that large is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB")  # palette, CMYK, RGBA, L -> RGB
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataReadError(f"cannot read image file {path!r}: {err}") from err
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def random_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    area: tuple[float, float],
    aspect: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop-style crop; the centre fallback clamps the aspect."""
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(_CROP_ATTEMPTS):
        target = height * width * rng.uniform(*area)
        ratio = math.exp(rng.uniform(*log_aspect))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < aspect[0]:
        w, h = width, int(round(width / aspect[0]))
    elif in_ratio > aspect[1]:
        h, w = height, int(round(height * aspect[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_square(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> ``[3, scale, scale]``, antialiased bilinear: DALI's resize, held to it by parity tests."""
    return F.resize(image, [scale, scale], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


class MultiScaleTransform:
    """One decoded sample -> ``{scale: uint8 [s, s, 3]}``: crop and flip once, largest scale first.

    Every random draw is seeded from ``(seed, epoch, index)``: ``index`` is the sample's position in
    its split (a file's index, or a packed sample's key), so the draws do not depend on the workers.
    """

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self._auto_augment = build_tv_auto_augment(spec.auto_augment)

    def __call__(self, image: torch.Tensor, *, epoch: int, index: int, scales: tuple[int, ...]) -> dict[int, torch.Tensor]:
        crop, flip = self._crop_and_flip(image, epoch, index)
        largest = resize_square(crop, scales[-1])
        if flip:
            largest = largest.flip(-1)
        if self.spec.train and self.spec.auto_augment.enabled:
            largest = self._auto_augment(largest, seed=self._auto_augment_seed(epoch, index))
        # Smaller scales come from the largest output: the same region, and far fewer pixels to filter.
        outputs = {s: resize_square(largest, s) for s in scales[:-1]}
        outputs[scales[-1]] = largest
        return {s: t.permute(1, 2, 0).contiguous() for s, t in outputs.items()}

    def _auto_augment_seed(self, epoch: int, index: int) -> int:
        # A stream of its own: turning augmentation on leaves the crops and flips of every sample as they were.
        stream = derived_seed(self.spec.seed, epoch, stream=AUTO_AUGMENT_STREAM)
        return int(np.random.default_rng([stream, index]).integers(2**63))

    def _crop_and_flip(self, image: torch.Tensor, epoch: int, index: int) -> tuple[torch.Tensor, bool]:
        height, width = image.shape[-2:]
        if not self.spec.train:
            top, left, side = eval_crop_box(height, width, self.spec.eval_crop_fraction)
            return image[:, top : top + side, left : left + side], False
        rng = np.random.default_rng([derived_seed(self.spec.seed, epoch, stream=AUGMENT_STREAM), index])
        top, left, h, w = random_crop_box(
            rng, height, width, area=self.spec.crop_area, aspect=self.spec.crop_aspect
        )
        return image[:, top : top + h, left : left + w], bool(rng.random() < 0.5)


class MultiScaleImageDataset(Dataset):
    """Map-style dataset keyed by :data:`SampleKey`; returns ``({scale: uint8 [s, s, 3]}, label)``."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self._transform = MultiScaleTransform(spec)

    def __len__(self) -> int:
        return len(self.spec.files)

    def __getitem__(self, key: SampleKey) -> tuple[dict[int, torch.Tensor], int]:
        index, epoch, scales = key
        image = load_rgb(self.spec.files[index])
        return self._transform(image, epoch=epoch, index=index, scales=scales), int(self.spec.labels[index])


class TorchvisionLoader:
    """:class:`~multiscale_dali.pipelines.spec.Loader` on a torch ``DataLoader`` (no DALI needed).

    Every batch is a pure function of ``(spec, epoch, step)``, so the resume state is that position
    and nothing else.
    """

    # The plain string: it goes into loader states, which torch.load(weights_only=True) must read.
    backend = Backend.TORCHVISION.value

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        self._device = torch.device(spec.device)
        self._position: tuple[int, int] | None = None  # (epoch, batches of it consumed)
        self._resume: tuple[int, int] | None = None  # loaded position, until the next epoch() call
        self._loader: DataLoader | None = self._data_loader()

    def _data_loader(self) -> DataLoader:
        """The DataLoader of the whole run (a shard source's loader builds another one)."""
        self._sampler = ScheduledBatchSampler(self.spec)
        return DataLoader(
            MultiScaleImageDataset(self.spec),
            batch_sampler=self._sampler,
            num_workers=self.spec.num_workers,
            pin_memory=self._device.type == "cuda",
            persistent_workers=self.spec.num_workers > 0,
        )

    def _set_epoch(self, epoch: int, first_step: int) -> None:
        """Point the DataLoader's next iteration at ``epoch`` from batch ``first_step`` on."""
        self._sampler.set_epoch(epoch, first_step=first_step)

    def __len__(self) -> int:
        return self.spec.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        if self._loader is None:
            raise RuntimeError("this TorchvisionLoader is closed")
        first_step = self._first_step(epoch)
        self._set_epoch(epoch, first_step)
        self._position = (epoch, first_step)
        # iter() now, so the sampler reads this epoch even if the caller starts consuming later.
        return self._batches(iter(self._loader), epoch, first_step)

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches consumed so far: ``{"backend", "epoch", "step", "spec"}``."""
        if self._loader is None:
            raise RuntimeError("this TorchvisionLoader is closed")
        position = self._position or self._resume
        if position is None:
            raise RuntimeError("no epoch has been started, so there is no position to save")
        return loader_state(self.backend, self.spec, *position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``epoch(e)`` of the state's epoch yield only its unconsumed batches."""
        if self._loader is None:
            raise RuntimeError("this TorchvisionLoader is closed")
        if self._position is not None:
            raise RuntimeError("load_state_dict must be called before the first epoch()")
        self._resume = check_loader_state(state, self.spec, backend=self.backend)

    def close(self) -> None:
        # Dropping the last reference to the DataLoader and its iterator shuts persistent workers down.
        self._loader = None

    def _first_step(self, epoch: int) -> int:
        if self._resume is None:
            return 0
        resume_epoch, step = self._resume
        if epoch < resume_epoch:
            raise ValueError(f"the loaded state resumes at epoch {resume_epoch}, epoch {epoch} was asked for")
        self._resume = None
        return step if epoch == resume_epoch else 0

    def _batches(self, batches: Iterator, epoch: int, first_step: int) -> Iterator[MultiScaleBatch]:
        scales = self.spec.schedule.scales_at(epoch)
        step = first_step
        for step, (images, labels, *valid) in enumerate(_unwrapped(batches), start=first_step + 1):
            if sorted(images) != list(scales):
                raise RuntimeError(f"epoch {epoch} produced scales {sorted(images)}, schedule says {list(scales)}")
            # A file dataset's padding follows from the position; a shard dataset says it per sample.
            mask = valid[0] if valid else padding_mask(self.spec, step - 1, len(labels))
            batch = to_model_batch(images, labels, self._device, channels_last=self.spec.channels_last, valid=mask)
            # Counted before the yield: while the caller holds this batch, it has been consumed.
            self._position = (epoch, step)
            yield batch
        if step != self.spec.steps_per_epoch:
            raise RuntimeError(f"epoch {epoch} yielded {step} batches, the spec expects {self.spec.steps_per_epoch}")
