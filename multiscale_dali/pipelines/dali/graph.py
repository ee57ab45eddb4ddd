"""The pieces of the DALI image graph, each a few operators: read, decode + crop, flip, resize cascade.

Train: ``readers.file`` (or ``readers.webdataset`` over a pack's shards, ``dali.shards``) -> fused ``decoders.image_random_crop`` (only the crop's region is decoded)
-> resize to the largest scale -> one coin-flip per sample -> every smaller scale resized from the
largest output. Eval replaces the random crop by a fused ROI decode of the centre square (cut from
the full image with the integer geometry of ``sampling.eval_crop_box``, then resized) and drops the
flip. The same graph runs on the GPU (``mixed`` decoder, GPU resizes) or on the CPU
(``device_id=None``); only the decoder's device differs (:class:`Placement`).

Progressive schedules change the output size between epochs without rebuilding the pipeline: the
sizes come from an ``external_source`` whose callback (:class:`ScheduledSizes`) is a pure function of
DALI's global iteration counter, because DALI runs that callback several batches ahead of the trainer.

:class:`GraphSpec` is everything the ``@pipeline_def`` functions of ``pipeline`` need, resolved once
from a :class:`~multiscale_dali.pipelines.spec.LoaderSpec` by :func:`graph_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import DataNode
from nvidia.dali.types import BatchInfo

from multiscale_dali.constants import DEFAULT_HW_DECODER_LOAD
from multiscale_dali.pipelines.augment import AutoAugmentSpec
from multiscale_dali.pipelines.dali.augment import auto_augment
from multiscale_dali.pipelines.dali.shards import shard_reader
from multiscale_dali.pipelines.sampling import SHUFFLE_STREAM, derived_seed, eval_crop_ratio, padded_sample_order
from multiscale_dali.pipelines.schedule import ScaleSchedule
from multiscale_dali.pipelines.spec import LoaderSpec, ShardSource

READER_NAME = "Reader"
LABELS_SLOT = "labels"


def scale_slot(position: int) -> str:
    """Output-map name of the ``position``-th smallest scale (the actual size may change per epoch)."""
    return f"scale{position}"


@dataclass(frozen=True)
class ScheduledSizes:
    """``external_source`` callback: the ``[s, s]`` resize targets of every scale slot for one batch.

    DALI calls it ahead of consumption with a ``BatchInfo`` whose ``iteration`` counts pipeline runs
    globally across reader epochs (its ``epoch_idx`` stays 0 with a file reader), so the epoch is derived
    from the iteration alone. The reader runs ``iterations_per_epoch`` batches per epoch whatever the
    iterator's last-batch policy (a dropped last batch is still run, then discarded). Frozen and
    picklable: no trainer state can leak in.
    """

    schedule: ScaleSchedule
    iterations_per_epoch: int
    batch_size: int
    first_epoch: int = 0

    def epoch_of(self, iteration: int) -> int:
        return self.first_epoch + iteration // self.iterations_per_epoch

    def __call__(self, info: BatchInfo) -> tuple[list[np.ndarray], ...]:
        scales = self.schedule.scales_at(self.epoch_of(info.iteration))
        return tuple([np.array([s, s], dtype=np.float32)] * self.batch_size for s in scales)


@dataclass(frozen=True)
class Placement:
    """Where the graph runs: ``device_id`` for the pipeline and the decoder's backend."""

    device_id: int | None
    decoder: str
    hw_decoder_load: float

    @property
    def decoder_args(self) -> dict:
        args: dict = {"device": self.decoder, "output_type": types.RGB}
        if self.decoder == "mixed":
            args["hw_decoder_load"] = self.hw_decoder_load
        return args


def placement_for(device: str, *, hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD) -> Placement:
    """CUDA devices get the mixed (nvJPEG / hardware) decoder; anything else a CPU-only pipeline."""
    torch_device = torch.device(device)
    if torch_device.type != "cuda":
        return Placement(device_id=None, decoder="cpu", hw_decoder_load=hw_decoder_load)
    index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
    return Placement(device_id=index, decoder="mixed", hw_decoder_load=hw_decoder_load)


@dataclass(frozen=True)
class GraphSpec:
    """Everything the pipeline function needs, resolved once from the loader spec."""

    files: tuple[str, ...]
    labels: tuple[int, ...]
    shard_id: int
    num_shards: int
    train: bool
    shuffle_seed: int
    crop_area: tuple[float, float]
    crop_aspect: tuple[float, float]
    eval_crop_fraction: float
    constant_scales: tuple[int, ...] | None
    sizes: ScheduledSizes
    placement: Placement
    auto_augment: AutoAugmentSpec = AutoAugmentSpec()
    shards: ShardSource | None = None  # read a pack's split instead of ``files``

    @property
    def train_augment(self) -> AutoAugmentSpec | None:
        """The automatic augmentation of this graph: train only, None when off."""
        return self.auto_augment if self.train and self.auto_augment.enabled else None

    @property
    def needs_conditionals(self) -> bool:
        """DALI's automatic augmentations choose their operation per sample with ``if`` in the graph."""
        return self.train_augment is not None


def pipeline_batch_size(spec: LoaderSpec) -> int:
    """The pipeline's batch size: ``spec.batch_size``, capped at the shard's sample count.

    DALI allocates its buffers for the full batch size up front, so a batch size far above the
    dataset (``--batch-size 100000000``) fails with ``std::bad_alloc`` before a file is read; capped,
    the one batch of an epoch holds the whole shard, as it would anyway.
    """
    return min(spec.batch_size, spec.shard_size)


def iterations_per_epoch(spec: LoaderSpec) -> int:
    """Pipeline runs per epoch on every shard and every epoch.

    The padded file list gives every shard exactly ``shard_size`` samples, and the reader pads only
    the last batch.
    """
    return -(-spec.shard_size // pipeline_batch_size(spec))


def _reader_shard_id(spec: LoaderSpec, first_epoch: int) -> int:
    """The ``shard_id`` the reader is built with.

    A training webdataset reader moves to the next block of the split every epoch, counting from the
    epoch the pipeline was built in; starting it ``first_epoch`` blocks on puts rank ``k`` on block
    ``(k + epoch) % num_shards`` in every epoch, however late the pipeline was built (the torchvision
    shard reader's layout). Folder readers pad one global list and need no offset.
    """
    if spec.shards is None or not spec.train:
        return spec.shard_id
    return (spec.shard_id + first_epoch) % spec.num_shards


def graph_for(spec: LoaderSpec, *, first_epoch: int) -> GraphSpec:
    """The graph of ``spec`` for a pipeline first built at ``first_epoch`` (its seeds derive from it)."""
    # Every shard pads the same global list, so shards are equal and shard sizes never change when
    # DALI rotates or reshuffles them (an unpadded 11 files over 3 shards read 3, 4, 4 samples).
    order = padded_sample_order(len(spec.files), spec.num_shards) if spec.files else []
    schedule = spec.schedule
    return GraphSpec(
        files=tuple(map(spec.files.__getitem__, order)),
        # The reader's "label" is the position in the padded list: DALI's global shuffle and shard
        # rotation move samples around, and the position is what tells a padded duplicate (position
        # >= len(files)) from its original. The loader maps it back to the real label on the host.
        labels=tuple(range(len(order))),
        shard_id=_reader_shard_id(spec, first_epoch),
        num_shards=spec.num_shards,
        train=spec.train,
        shuffle_seed=derived_seed(spec.seed, first_epoch, stream=SHUFFLE_STREAM),
        crop_area=tuple(spec.crop_area),
        crop_aspect=tuple(spec.crop_aspect),
        eval_crop_fraction=spec.eval_crop_fraction,
        constant_scales=schedule.final_scales if schedule.is_constant else None,
        sizes=ScheduledSizes(
            schedule=schedule,
            iterations_per_epoch=iterations_per_epoch(spec),
            batch_size=pipeline_batch_size(spec),
            first_epoch=first_epoch,
        ),
        placement=placement_for(spec.device, hw_decoder_load=spec.hw_decoder_load),
        auto_augment=spec.auto_augment,
        shards=spec.shards,
    )


def read_input(graph: GraphSpec) -> tuple[DataNode, DataNode]:
    """Encoded images and what the loader turns into labels: the padded-list positions of a file
    reader, or the labels themselves from a pack's shards."""
    if graph.shards is None:
        return read_files(graph)
    source = graph.shards
    return shard_reader(
        source.manifest, source.split, train=graph.train, shard_id=graph.shard_id, num_shards=graph.num_shards,
        initial_fill=source.shuffle_buffer, seed=graph.shuffle_seed, name=READER_NAME,
        # Eval reads the same block every epoch, like the file reader.
        stick_to_shard=not graph.train,
    )


def read_files(graph: GraphSpec) -> tuple[DataNode, DataNode]:
    """Encoded files and their positions in the padded list, sharded and (in train) shuffled per epoch."""
    return fn.readers.file(
        files=list(graph.files),
        labels=list(graph.labels),
        name=READER_NAME,
        shard_id=graph.shard_id,
        num_shards=graph.num_shards,
        pad_last_batch=True,
        shuffle_after_epoch=graph.train,
        shuffle_after_epoch_seed=graph.shuffle_seed if graph.train else None,
        # Eval reads the same shard every epoch; DALI rotates shards between epochs otherwise.
        stick_to_shard=not graph.train,
    )


def decode_random_crop(encoded: DataNode, graph: GraphSpec) -> DataNode:
    """Train: a random resized crop's region, decoded fused (nothing outside it is decoded)."""
    return fn.decoders.image_random_crop(
        encoded,
        random_area=list(graph.crop_area),
        random_aspect_ratio=list(graph.crop_aspect),
        **graph.placement.decoder_args,
    )


def decode_centre_crop(encoded: DataNode, graph: GraphSpec) -> DataNode:
    """Eval: decode only the centre square; integer maths identical to ``sampling.eval_crop_box``."""
    # int32: the slice arguments reject int64. H, W, C after EXIF orientation, like the decoder.
    shape = fn.peek_image_shape(encoded, dtype=types.INT32)
    height, width = shape[0], shape[1]
    num, den = eval_crop_ratio(graph.eval_crop_fraction)
    side = dmath.max(dmath.min(height, width) * num // den, 1)
    return fn.decoders.image_slice(
        encoded,
        start=fn.stack((width - side) // 2, (height - side) // 2),
        shape=fn.stack(side, side),
        axis_names="WH",
        **graph.placement.decoder_args,
    )


def decode_crop(encoded: DataNode, graph: GraphSpec) -> DataNode:
    """The crop of the graph's geometry: random in train, the centre square in eval."""
    return decode_random_crop(encoded, graph) if graph.train else decode_centre_crop(encoded, graph)


def random_flip(graph: GraphSpec) -> DataNode | None:
    """One coin per sample in train, shared by every scale; no flip in eval."""
    return fn.random.coin_flip(probability=0.5) if graph.train else None


def scale_sizes(graph: GraphSpec) -> list[DataNode] | list[list[float]]:
    """Resize targets per scale slot: constants, or a per-batch input that follows the schedule."""
    if graph.constant_scales is not None:
        return [[float(s), float(s)] for s in graph.constant_scales]
    nodes = fn.external_source(
        source=graph.sizes,
        num_outputs=graph.sizes.schedule.num_scales,
        batch=True,
        batch_info=True,
    )
    return list(nodes)


def resize(image: DataNode, size) -> DataNode:
    """Antialiased bilinear: what ``torchvision_backend.resize_square`` is held to by the parity tests."""
    return fn.resize(image, size=size, antialias=True, interp_type=types.INTERP_LINEAR)


def resize_cascade(crop: DataNode, sizes: Sequence, flip: DataNode | None,
                   augment: AutoAugmentSpec | None = None) -> list[DataNode]:
    """Largest scale from the crop, the others from the largest: one region, one flip, one augmentation
    draw (when ``augment`` is on), cheap resizes."""
    largest = resize(crop, sizes[-1])
    if flip is not None:
        largest = fn.flip(largest, horizontal=flip)
    if augment is not None:
        largest = auto_augment(largest, augment, shape=sizes[-1])
    return [resize(largest, size) for size in sizes[:-1]] + [largest]
