"""What a loader is asked to produce, independent of the backend that produces it.

Both backends (``dali.loader.DaliLoader`` and ``torchvision_backend.TorchvisionLoader``) take a
:class:`LoaderSpec` and implement :class:`Loader`; trainers only ever see :class:`Loader`.

Image geometry shared by both backends (the parity test holds them to it):

* train: one random resized crop per sample (area fraction in ``crop_area``, aspect ratio in
  ``crop_aspect``) and one horizontal flip with probability 0.5, shared by every scale;
* eval: one centre square crop of side ``eval_crop_fraction * min(H, W)`` (floored) cut from the
  full image, no flip;
* the crop is resized (antialiased, bilinear) to the largest scale of the epoch; every smaller
  scale is resized from that largest output, so all scales show exactly the same region.

The samples come from a file list (``files``/``labels``, an ImageFolder's split) or from one split
of a packed directory (``shards``, a :class:`ShardSource`; ``files`` and ``labels`` are then empty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol

from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.pipelines.batch import MultiScaleBatch
from multiscale_dali.constants import (
    DEFAULT_CROP_AREA,
    DEFAULT_CROP_ASPECT,
    DEFAULT_HW_DECODER_LOAD,
    EVAL_CROP_FRACTION,
)
from multiscale_dali.data.shard_format import DEFAULT_SHUFFLE_BUFFER, Manifest
from multiscale_dali.pipelines.augment import AutoAugmentSpec
from multiscale_dali.pipelines.schedule import ScaleSchedule


class DataReadError(UserError, RuntimeError, exit_code=EXIT_FAILURE,
                    hint="Files that passed the pre-flight scan were changed, moved or deleted during the run, or "
                         "--no-scan let a bad one through; the run's checkpoints are kept (--resume auto continues)."):
    """A loader could not read or decode an image in the middle of a run; the message names the file."""


def worker_message(err: BaseException) -> str:
    """``err``'s own message, without the traceback a DataLoader worker wraps around it.

    A worker's exception reaches the main process as the same type, with ``Caught X in DataLoader
    worker process N. Original Traceback ...`` and the formatted traceback as its message; the last
    line is the original ``module.Type: message``.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


@dataclass(frozen=True)
class ShardSource:
    """One split of a packed directory, read in packed order (eval) or through a shuffle buffer (train).

    ``shuffle_buffer`` samples are held per reader (DALI's ``initial_fill``; per DataLoader worker
    on torchvision). A buffer shuffle is not a full permutation: a sample only moves about a buffer's
    length from its packed place. The pack stored the split in one full seeded permutation, so
    batches still mix classes; what stays fixed between epochs is which samples can meet in a batch
    (neighbours in the packed order) and, with several ranks, which block of the split a rank reads
    in a given epoch (blocks rotate between ranks every epoch).
    """

    manifest: Manifest
    split: str
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    def __post_init__(self) -> None:
        self.manifest.split(self.split)  # raises for an unknown split name
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")

    @property
    def num_samples(self) -> int:
        return self.manifest.split(self.split).samples

    def resume_fields(self) -> dict[str, Any]:
        """What a loader state on this source is only valid under (plain data): the shards by checksum,
        not by path, so a pack moved or mounted elsewhere still resumes."""
        return {"split": self.split,
                "shards": [s.sha256 for s in self.manifest.split(self.split).shards],
                "shuffle_buffer": self.shuffle_buffer}


@dataclass(frozen=True)
class LoaderSpec:
    files: tuple[str, ...]
    labels: tuple[int, ...]
    schedule: ScaleSchedule
    batch_size: int
    train: bool
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 2  # DALI CPU threads, or torchvision DataLoader worker processes
    shard_id: int = 0
    num_shards: int = 1
    drop_last: bool = False
    channels_last: bool = True
    crop_area: tuple[float, float] = DEFAULT_CROP_AREA
    crop_aspect: tuple[float, float] = DEFAULT_CROP_ASPECT
    eval_crop_fraction: float = EVAL_CROP_FRACTION
    # DALI only: the share of JPEG decoding sent to the hardware decoder on GPUs that have one.
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD
    # Train only: one automatic-augmentation draw per sample on the largest scale, before the smaller
    # scales are resized from it, so every scale shows the same augmented image.
    auto_augment: AutoAugmentSpec = AutoAugmentSpec()
    # A split of a packed directory instead of files (then files and labels are empty).
    shards: ShardSource | None = None

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")
        if self.shards is not None and self.files:
            raise ValueError("a loader reads either files or shards, not both")
        if not self.num_samples:
            raise ValueError("a loader needs at least one file" if self.shards is None else
                             f"split {self.shards.split} of {self.shards.manifest.directory} is empty")
        if self.shards is not None and self.num_samples < self.num_shards:
            # A shard reader reads a block of the split, and an empty block has nothing to pad with.
            raise ValueError(f"split {self.shards.split} of {self.shards.manifest.directory} has "
                             f"{self.num_samples} samples, fewer than the {self.num_shards} ranks reading it")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got {self.shard_id}/{self.num_shards}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")

    @property
    def num_samples(self) -> int:
        """Samples of the split, whichever the source."""
        return len(self.files) if self.shards is None else self.shards.num_samples

    @property
    def shard_size(self) -> int:
        """Samples per shard, padded so every shard has the same count (DALI's pad_last_batch)."""
        return math.ceil(self.num_samples / self.num_shards)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.shard_size, self.batch_size)
        return full if (self.drop_last and full) else full + (1 if rest else 0)


class Loader(Protocol):
    """One epoch at a time of :class:`MultiScaleBatch` on ``spec.device``."""

    backend: str
    spec: LoaderSpec

    def __len__(self) -> int:
        """Batches per epoch on this shard."""

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        """Yield the batches of ``epoch`` at ``spec.schedule.scales_at(epoch)``.

        Epochs are consumed in order 0, 1, 2, ... (a resumed run may start later); every batch of
        the epoch must be consumed before the next epoch is asked for. After :meth:`load_state_dict`,
        the state's epoch yields only the batches from the saved step on.
        """

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches consumed so far, for an exact resume in a new process.

        Callable between two batches of an epoch (its generator suspended) and after an epoch's last
        batch (then ``step == len(self)``). Plain data only (str, int, float, bool, list, dict), so a
        checkpoint holding it loads with ``torch.load(weights_only=True)``. Always has ``backend``,
        ``epoch``, ``step`` and ``spec`` (the spec fields it is only valid under); a backend may add
        its own key (DALI: its serialized pipeline checkpoint).
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` on a freshly built loader, before any :meth:`epoch` call.

        ``epoch(state["epoch"])`` then yields the batches from ``state["step"]`` on, and later epochs
        are the ones an uninterrupted run would have produced, bit for bit; when the saved step is the
        end of the epoch, the caller asks for the next epoch. A state from another backend or another
        batch size, shard layout, sample count, seed or schedule raises ``ValueError`` naming it.
        """

    def close(self) -> None:
        """Release worker processes / pipelines."""
