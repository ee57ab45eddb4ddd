"""The torchvision backend on a packed directory: the folder loader's semantics over tar shards.

:class:`TorchvisionShardLoader` is :class:`~multiscale_dali.pipelines.torchvision_backend.TorchvisionLoader`
with another DataLoader underneath: an iterable dataset that streams the rank's samples out of the
tars (:class:`~multiscale_dali.pipelines.shards_torchvision.ShardIterableDataset`, in its
batch-interleaved worker layout) and turns each into every scale with the folder loader's own
transform. What that gives:

* the rank's blocks, padding and epochs are those of the DALI reader over the same pack: rank ``k``
  reads block ``(k + epoch) % num_shards`` in training, block ``k`` in every evaluation epoch, and
  padded duplicates carry ``valid=False``, so every sample counts once per epoch over the ranks;
* batches come out in the rank's order whatever the worker count (worker ``w`` makes batches ``w``,
  ``w + W``, ...), only the last can be partial, and the count is ``spec.steps_per_epoch``;
* every random draw is seeded from ``(seed, epoch, key)`` and the shuffle buffer from ``(seed,
  epoch, rank, worker)``, so an epoch is a pure function of the spec and the worker count: a resumed
  epoch re-reads the skipped batches' bytes (for the shuffle to draw the same) and decodes none of them.

Workers persist over the run, as the folder loader's do: restarting them every epoch, and decoding
the dropped last batch, had cost 15-20% of the throughput of 240-image epochs on 2 cores (shards
0.85x and 0.79x of the folder with 1 and 2 workers, 1.08x and 1.07x since). The epoch and the
batches to skip reach them in shared memory (:class:`EpochBoard`), read when a worker starts
iterating an epoch, which a DataLoader makes it do only when the main process starts the epoch.
"""

from __future__ import annotations

import multiprocessing
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from multiscale_dali.data.shard_format import ShardError, key_position
from multiscale_dali.pipelines.shards_torchvision import ShardIterableDataset, decode_jpeg_rgb
from multiscale_dali.pipelines.spec import LoaderSpec
from multiscale_dali.pipelines.torchvision_backend import MultiScaleTransform, TorchvisionLoader

__all__ = ["MultiScaleShardDataset", "TorchvisionShardLoader"]

ShardItem = tuple[dict[int, torch.Tensor], int, bool]  # ({scale: uint8 [s, s, 3]}, label, valid)


class EpochBoard:
    """The epoch to read and the batches to skip, in shared memory: set by the main process, read by
    DataLoader workers that outlive an epoch (their copy of the dataset was made when they started)."""

    def __init__(self) -> None:
        self._values = multiprocessing.Array("q", [0, 0])

    def post(self, epoch: int, skip_batches: int) -> None:
        with self._values.get_lock():
            self._values[0], self._values[1] = epoch, skip_batches

    def read(self) -> tuple[int, int]:
        with self._values.get_lock():
            return int(self._values[0]), int(self._values[1])


class MultiScaleShardDataset(IterableDataset):
    """The samples of one rank of a shard source, each as every scale of the epoch, its label and ``valid``."""

    def __init__(self, spec: LoaderSpec) -> None:
        super().__init__()
        source = spec.shards
        if source is None:
            raise ValueError("MultiScaleShardDataset needs a spec with a shard source")
        self.spec = spec
        self.samples = ShardIterableDataset(
            source.manifest, source.split, train=spec.train, seed=spec.seed, shard_id=spec.shard_id,
            num_shards=spec.num_shards, shuffle_buffer=source.shuffle_buffer, batch_size=spec.batch_size,
            # LoaderSpec keeps a lone partial batch even with drop_last.
            drop_last=spec.drop_last and spec.shard_size >= spec.batch_size,
        )
        self._transform = MultiScaleTransform(spec)
        self._board = EpochBoard()

    def set_epoch(self, epoch: int, *, skip_batches: int = 0) -> None:
        """Read ``epoch`` next (evaluation reads its fixed block), without its first ``skip_batches`` batches."""
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"need epoch >= 0 and skip_batches >= 0, got {epoch} and {skip_batches}")
        self._board.post(epoch, skip_batches)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[ShardItem]:
        epoch, skip_batches = self._board.read()
        scales = tuple(self.spec.schedule.scales_at(epoch))
        # This process's own copy of the reader (a worker's, or the main process's without workers).
        self.samples.set_epoch(epoch if self.spec.train else 0, skip_batches=skip_batches)
        for sample in self.samples:
            image = decode_jpeg_rgb(sample.image)
            views = self._transform(image, epoch=epoch, index=key_position(sample.key), scales=scales)
            yield views, sample.label, sample.valid


class TorchvisionShardLoader(TorchvisionLoader):
    """:class:`~multiscale_dali.pipelines.spec.Loader` over a shard source (see the module docstring).

    State and resume are the folder loader's: an epoch is a pure function of the spec, so the
    position ``(epoch, step)`` is the whole state.
    """

    def _data_loader(self) -> DataLoader:
        spec = self.spec
        self._dataset = MultiScaleShardDataset(spec)
        return DataLoader(
            self._dataset,
            batch_size=spec.batch_size,
            # The dataset leaves a dropped batch out itself, undecoded; this only states the rule.
            drop_last=spec.drop_last and spec.shard_size >= spec.batch_size,
            num_workers=spec.num_workers,
            pin_memory=self._device.type == "cuda",
            persistent_workers=spec.num_workers > 0,
        )

    def _set_epoch(self, epoch: int, first_step: int) -> None:
        self._dataset.set_epoch(epoch, skip_batches=first_step)

    def _batches(self, batches: Iterator, epoch: int, first_step: int) -> Iterator:
        return super()._batches(_worker_errors_as_raised(batches), epoch, first_step)


def _worker_errors_as_raised(batches: Iterator) -> Iterator:
    """The batches, with a damaged shard's error as the reader raised it.

    A DataLoader re-raises a worker's exception in the main process with the worker's traceback
    as its message; a damaged pack is the user's to fix, and its message is one line naming the
    shard and key, so that line (the traceback's last) is what is raised again.
    """
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ShardError as err:
            last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            raise ShardError(last.split("ShardError: ", 1)[-1]) from None
        yield batch
