"""The DALI reader of a packed dataset: ``fn.readers.webdataset`` over a split's tar shards.

:func:`shard_reader` returns the ``(jpegs, labels)`` nodes that replace ``fn.readers.file`` in a
pipeline graph: ``jpegs`` are the encoded ``.jpg`` members (uint8 bytes, ready for
``fn.decoders.image`` or ``fn.decoders.image_random_crop``), ``labels`` the ``.lbl`` members read
with ``dtypes=INT64``, one int64 per sample of shape ``(1,)`` like the file reader's labels. The
``.cls`` members hold the same label as decimal text, which no DALI operator parses; the pack
stores the raw int64 beside it for that reason (see ``data.shard_format``), so no Python callback
runs per sample.

What the reader does, checked on DALI 2.4 (CPU) and held by tests/test_dali_shards.py:

* sharding is by sample, over the concatenated tars: reader ``k`` of ``S`` reads the contiguous
  block ``reader_block(N, k, S)``, and moves to the next block every epoch (``stick_to_shard``
  stays False), so the reader reads block ``(k + epoch) % S`` in ``epoch``;
* ``pad_last_batch=True`` repeats the last sample read until the batch is full, and only after
  every real sample of the block, shuffled or not; with a ``reader_name`` iterator and ``ceil(N /
  S)`` samples per epoch, every reader runs the same number of batches. The first
  :func:`valid_samples` samples of a reader's epoch are real, the rest are padding;
* ``random_shuffle=True`` shuffles inside a buffer of ``initial_fill`` samples, not a full
  permutation; the pack stored each split in a full seeded permutation to make up for it
  (see ``data.shards``). ``shuffle_tars=True`` (training only) additionally reshuffles the order
  of the tars before every epoch, the first included (DALI's ``shuffle_after_epoch``, the same
  order on every reader given the same ``tar_order_seed``): each reader then keeps block
  ``shard_id`` of the reshuffled sequence instead of moving to the next block, so its samples
  change every epoch while reads stay sequential within a tar. The torchvision shard reader has no
  equivalent; :func:`valid_samples` knows both layouts;
* with ``enable_checkpointing=True`` on the pipeline, a pipeline rebuilt from a checkpoint replays
  the following batches exactly.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali.pipeline import DataNode

from multiscale_dali.data.shard_format import (
    DEFAULT_SHUFFLE_BUFFER,
    IMAGE_EXT,
    LABEL_RAW_EXT,
    Manifest,
    reader_block,
)

__all__ = ["DEFAULT_INITIAL_FILL", "READER_NAME", "shard_reader", "valid_samples"]

# DALI's own default buffer; about 100 MB of ImageNet-sized JPEGs.
DEFAULT_INITIAL_FILL = DEFAULT_SHUFFLE_BUFFER
READER_NAME = "Reader"


def shard_reader(
    manifest: Manifest,
    split: str,
    *,
    train: bool,
    shard_id: int = 0,
    num_shards: int = 1,
    initial_fill: int = DEFAULT_INITIAL_FILL,
    shuffle_tars: bool = False,
    tar_order_seed: int | None = None,
    seed: int = -1,
    name: str = READER_NAME,
    stick_to_shard: bool = False,
) -> tuple[DataNode, DataNode]:
    """``(jpegs, labels)`` nodes reading ``split`` of ``manifest``; call inside a pipeline definition.

    ``train`` turns on the buffer shuffle (and, with ``shuffle_tars``, the per-epoch tar order
    shuffle, seeded by ``tar_order_seed``, DALI's fixed default when None; give every rank the
    same); ``seed`` -1 takes the pipeline's seed; ``name`` is the ``reader_name`` for iterators;
    ``stick_to_shard`` keeps the reader on block ``shard_id`` every epoch (evaluation: every epoch
    then reads the same samples in the same order, whatever came before).
    """
    info = manifest.split(split)
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got {shard_id}/{num_shards}")
    if info.samples < num_shards:
        raise ValueError(f"split {split} of {manifest.directory} has {info.samples} samples, fewer than the "
                         f"{num_shards} readers sharing it")
    if initial_fill < 1:
        raise ValueError(f"initial_fill must be >= 1, got {initial_fill}")
    shuffles_tars = train and shuffle_tars
    tar_order = {"shuffle_after_epoch_seed": tar_order_seed} if shuffles_tars and tar_order_seed is not None else {}
    jpegs, labels = fn.readers.webdataset(
        paths=[str(p) for p in manifest.shard_paths(split)],
        index_paths=[str(p) for p in manifest.index_paths(split)],
        ext=[IMAGE_EXT, LABEL_RAW_EXT],
        dtypes=[types.UINT8, types.INT64],
        # A sample without both members means a damaged pack: stop, never feed an empty image.
        missing_component_behavior="error",
        random_shuffle=train,
        initial_fill=initial_fill,
        shuffle_after_epoch=shuffles_tars,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        stick_to_shard=stick_to_shard,
        seed=seed,
        name=name,
        **tar_order,
    )
    return jpegs, labels


def valid_samples(num_samples: int, *, shard_id: int, num_shards: int, epoch: int, shuffle_tars: bool = False) -> int:
    """Real (not padding) samples reader ``shard_id`` yields first in ``epoch``: the size of its block.

    Readers move to the next block every epoch, except with ``shuffle_tars`` (DALI's
    ``shuffle_after_epoch``), where reader ``k`` keeps block ``k`` of a reshuffled tar order.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    block = shard_id if shuffle_tars else (shard_id + epoch) % num_shards
    return len(reader_block(num_samples, block, num_shards))
