"""Read a packed dataset's tar shards without DALI: a torch ``IterableDataset`` on plain ``tarfile``.

Layout, the same as DALI's webdataset reader (so both backends put the same samples on a rank):

* a split's shards are one sequence of samples in packed order (position ``p`` is key ``p``);
* rank ``shard_id`` of ``num_shards`` reads, in epoch ``e``, the contiguous block
  ``reader_block(N, (shard_id + e) % num_shards, num_shards)``: DALI moves every reader to the next
  block each epoch (its default ``stick_to_shard=False``), and so does this reader;
* inside a rank, DataLoader worker ``w`` of ``W`` takes the ``w``-th contiguous slice of the rank's
  padded sequence, so each worker streams its tars sequentially (one seek per tar, via the DALI
  index files for the first sample) and no two workers read the same sample;
* or, with ``batch_size`` (what the torchvision loader uses), worker ``w`` takes batches ``w``,
  ``w + W``, ... of the rank's padded sequence: a DataLoader collects one batch from each worker in
  turn, so its batches come out in the rank's order whatever the worker count, only the last batch
  can be partial, and a resume skips whole batches of known workers (``set_epoch(skip_batches=)``,
  the DataLoader's first worker then making the first batch not skipped).

Padding, so that every rank runs the same number of steps: every rank yields exactly
``samples_per_reader(N, num_shards) = ceil(N / num_shards)`` samples per epoch (that is ``len()``);
a block one short of it repeats its last sample once more with ``valid=False``, as DALI's
``pad_last_batch`` does. Counting only ``valid`` samples, every sample of the split is seen exactly
once per epoch over all ranks and workers. The per-worker slice sizes depend only on that length
and the worker count, so with the same ``batch_size`` and workers every rank's DataLoader yields
the same number of batches (each worker's last batch may be partial).

Shuffling (``train=True``): each worker passes its stream through a buffer of ``shuffle_buffer``
samples, seeded by ``(seed, epoch, shard_id, worker)``: a sample leaves the buffer at a random
moment, so the order differs per epoch but a sample only moves about a buffer's length away from
its packed place. That is enough because the pack stored each split in one full, seeded permutation
(see :mod:`multiscale_dali.data.shards`); a buffer alone cannot undo a sorted order. Evaluation
(``train=False``) yields samples in packed order.

The epoch comes from :meth:`ShardIterableDataset.set_epoch`, read when a worker starts iterating:
use a DataLoader with ``persistent_workers=False`` (workers are then re-created each epoch from the
main-process dataset) or call :meth:`~ShardIterableDataset.iter_epoch` directly.

Each sample is a :class:`ShardSample`: the JPEG bytes (or, with ``decode=True``, a uint8
``[3, H, W]`` tensor decoded like the folder loader: RGB, EXIF orientation applied), the label from
the ``.cls`` member, the ``valid`` flag and the key.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import tarfile
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from multiscale_dali.data.shard_format import (
    DEFAULT_SHUFFLE_BUFFER,
    IMAGE_EXT,
    LABEL_TEXT_EXT,
    TAR_BLOCK,
    Manifest,
    ShardError,
    parse_index,
    reader_block,
    sample_key,
    samples_per_reader,
)

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "ShardSample", "ShardIterableDataset", "reader_positions", "decode_jpeg_rgb"]

log = logging.getLogger(__name__)



class ShardSample(NamedTuple):
    image: bytes | torch.Tensor
    label: int
    valid: bool
    key: str


def reader_positions(
    num_samples: int, *, shard_id: int, num_shards: int, epoch: int, worker_id: int = 0, num_workers: int = 1,
    batch_size: int | None = None,
) -> list[tuple[int, bool]]:
    """``(position, valid)`` pairs worker ``worker_id`` of rank ``shard_id`` reads in ``epoch``, in packed order.

    See the module docstring for the layout, the padding and what ``batch_size`` changes.
    """
    if num_samples < num_shards:
        raise ValueError(f"{num_samples} samples cannot be spread over {num_shards} ranks: each needs one")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}/{num_workers}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    block = reader_block(num_samples, (shard_id + epoch) % num_shards, num_shards)
    length = samples_per_reader(num_samples, num_shards)
    padded = [(p, True) for p in block] + [(block[-1], False)] * (length - len(block))
    if batch_size is not None:
        return [p for first in range(worker_id * batch_size, length, num_workers * batch_size)
                for p in padded[first : first + batch_size]]
    return padded[worker_id * length // num_workers : (worker_id + 1) * length // num_workers]


def worker_skip(batches: int, *, worker_id: int, num_workers: int) -> int:
    """How many of the first ``batches`` batches of a rank came from worker ``worker_id`` (batch layout)."""
    return max(0, -(-(batches - worker_id) // num_workers))


def decode_jpeg_rgb(data: bytes) -> torch.Tensor:
    """uint8 ``[3, H, W]`` of an encoded image: RGB, EXIF orientation applied (the folder loader's decode)."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


class ShardIterableDataset(IterableDataset):
    """The samples of one split of a pack for one rank (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        *,
        train: bool,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        decode: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        info = manifest.split(split)
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got {shard_id}/{num_shards}")
        if info.samples < num_shards:
            raise ValueError(f"split {split} of {manifest.directory} has {info.samples} samples, fewer than the "
                             f"{num_shards} ranks reading it")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split = split
        self.train = train
        self.seed = seed
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.shuffle_buffer = shuffle_buffer
        self.decode = decode
        self.batch_size = batch_size
        # With batch_size: the rank's last batch, when partial, is left out before it is decoded.
        self.drop_last = drop_last and batch_size is not None
        self._num_classes = manifest.num_classes
        self._num_samples = info.samples
        self._tars = tuple(manifest.directory / s.name for s in info.shards)
        self._indexes = tuple(manifest.directory / s.index for s in info.shards)
        self._starts = tuple(int(x) for x in np.cumsum([0] + [s.samples for s in info.shards])[:-1])
        self._epoch = 0
        self._skip_batches = 0
        self._index_cache: tuple[int, list] | None = None  # (tar, its parsed index): the last one read

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """The epoch the next iteration reads; ``skip_batches`` > 0 (needs ``batch_size``) leaves out the
        rank's first batches, as a resumed epoch must: nothing skipped is decoded."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if skip_batches < 0 or (skip_batches and self.batch_size is None):
            raise ValueError(f"skip_batches must be >= 0 and needs batch_size, got {skip_batches}")
        self._epoch = epoch
        self._skip_batches = skip_batches

    def __len__(self) -> int:
        """Samples this rank yields per epoch over all its workers, padding included."""
        return samples_per_reader(self._num_samples, self.num_shards)

    def __iter__(self) -> Iterator[ShardSample]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if self.batch_size is not None:
            # A DataLoader asks its workers in turn starting with worker 0, so after skipping k
            # batches worker 0 must make batch k: workers take the roles of the batch layout rotated.
            worker_id = (worker_id + self._skip_batches) % num_workers
        return self.iter_epoch(self._epoch, worker_id=worker_id, num_workers=num_workers,
                               skip_batches=self._skip_batches)

    def iter_epoch(self, epoch: int, *, worker_id: int = 0, num_workers: int = 1,
                   skip_batches: int = 0) -> Iterator[ShardSample]:
        """The samples of worker ``worker_id`` of ``num_workers`` in ``epoch`` (shuffled when training),
        without the rank's first ``skip_batches`` batches."""
        positions = reader_positions(self._num_samples, shard_id=self.shard_id, num_shards=self.num_shards,
                                     epoch=epoch, worker_id=worker_id, num_workers=num_workers,
                                     batch_size=self.batch_size)
        skip = 0 if self.batch_size is None else self.batch_size * worker_skip(
            skip_batches, worker_id=worker_id, num_workers=num_workers)
        end = len(positions) - (len(positions) % self.batch_size if self.drop_last else 0)
        if not self.train:
            positions, skip, end = positions[skip:end], 0, None
        samples = self._read(positions)
        if self.train:
            # The shuffle of a resumed epoch must see the whole stream to draw what it drew before;
            # the skipped samples, and those of a dropped last batch (random ones, as with a
            # folder), are read (bytes only) and dropped before any decode.
            rng = np.random.default_rng([self.seed, epoch, self.shard_id, worker_id])
            samples = itertools.islice(_buffer_shuffle(samples, self.shuffle_buffer, rng), skip, end)
        for sample in samples:
            yield sample._replace(image=decode_jpeg_rgb(sample.image)) if self.decode else sample

    def _read(self, positions: list[tuple[int, bool]]) -> Iterator[ShardSample]:
        for first, count, valid in _runs(positions):
            yield from self._read_run(first, count, valid)

    def _read_run(self, first: int, count: int, valid: bool) -> Iterator[ShardSample]:
        """``count`` consecutive samples from position ``first``, across tar boundaries."""
        position, end = first, first + count
        while position < end:
            tar = bisect.bisect_right(self._starts, position) - 1
            in_tar = min(end, self._starts[tar] + self._shard_samples(tar)) - position
            yield from self._read_tar(tar, position, in_tar, valid)
            position += in_tar

    def _shard_samples(self, tar: int) -> int:
        following = self._starts[tar + 1] if tar + 1 < len(self._starts) else self._num_samples
        return following - self._starts[tar]

    def _read_tar(self, tar: int, position: int, count: int, valid: bool) -> Iterator[ShardSample]:
        path = self._tars[tar]
        if self._index_cache is None or self._index_cache[0] != tar:
            # A batch-interleaved worker reads one batch of a tar at a time and comes back to it for
            # the next; positions only grow, so the last index read is the one needed again.
            self._index_cache = (tar, parse_index(self._indexes[tar].read_text(encoding="ascii"),
                                                  source=str(self._indexes[tar])))
        entries = self._index_cache[1]
        # The first member's header sits one block before its data.
        header = entries[position - self._starts[tar]][0][1] - TAR_BLOCK
        expected = position
        with open(path, "rb") as handle:
            handle.seek(header)
            try:
                for key, members in _grouped(_stream_members(handle)):
                    wanted = sample_key(expected, self._num_samples)
                    if key != wanted:
                        raise ShardError(f"shard {path} holds sample {key} where {wanted} was expected: "
                                         f"the pack is damaged, verify it")
                    yield ShardSample(image=members[IMAGE_EXT], label=self._label(members, path, key), valid=valid,
                                      key=key)
                    expected += 1
                    if expected == position + count:
                        return
            except ShardError:
                raise
            except (tarfile.TarError, EOFError, KeyError, ValueError) as exc:
                raise ShardError(f"shard {path} is truncated or corrupt near sample "
                                 f"{sample_key(expected, self._num_samples)}: {exc!r}") from None
        raise ShardError(f"shard {path} ends before sample {sample_key(expected, self._num_samples)}")


    def _label(self, members: dict[str, bytes], path, key: str) -> int:
        """The label of a sample, or ``ShardError`` naming the shard and key of a damaged one."""
        missing = [ext for ext in (IMAGE_EXT, LABEL_TEXT_EXT) if ext not in members]
        if missing:
            raise ShardError(f"shard {path}: sample {key} has no .{missing[0]} member")
        try:
            label = int(members[LABEL_TEXT_EXT].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ShardError(f"shard {path}: sample {key} has label text {members[LABEL_TEXT_EXT][:20]!r}, "
                             f"not a decimal integer") from None
        if not 0 <= label < self._num_classes:
            raise ShardError(f"shard {path}: sample {key} has label {label}, outside 0..{self._num_classes - 1} "
                             f"(the manifest's classes)")
        return label


def _runs(positions: list[tuple[int, bool]]) -> Iterator[tuple[int, int, bool]]:
    """``(first, count, valid)`` for each stretch of consecutive positions sharing one validity."""
    start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != (positions[i - 1][0] + 1, positions[i - 1][1]):
            yield positions[start][0], i - start, positions[start][1]
            start = i


def _stream_members(handle) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the tar members from the handle's position on, read strictly in order."""
    with tarfile.open(fileobj=handle, mode="r|") as archive:
        for member in archive:
            extracted = archive.extractfile(member)
            yield member.name, extracted.read() if extracted is not None else b""


def _grouped(members: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Members grouped by key (the name up to its first dot), in tar order."""
    key: str | None = None
    group: dict[str, bytes] = {}
    for name, data in members:
        member_key, _, ext = name.partition(".")
        if member_key != key and key is not None:
            yield key, group
            group = {}
        key = member_key
        group[ext] = data
    if key is not None:
        yield key, group


def _buffer_shuffle(samples: Iterable[ShardSample], size: int, rng: np.random.Generator) -> Iterator[ShardSample]:
    """Hold up to ``size`` samples; each new one replaces (and releases) a uniformly drawn one."""
    buffer: list[ShardSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer
