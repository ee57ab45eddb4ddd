"""The DALI pipelines: decode each image once, crop and flip it once, emit every scale of the epoch.

The ``@pipeline_def`` functions only wire the pieces of ``graph`` together, in the style of DALI's
ResNet-50 example; :class:`~multiscale_dali.pipelines.dali.loader.DaliLoader` builds and iterates
them. Only ``pipelines.dali`` imports ``nvidia.dali``; everything else imports it lazily, so the
package works without DALI installed.
"""

from __future__ import annotations

from typing import Sequence

from nvidia.dali import fn, pipeline_def
from nvidia.dali.pipeline import DataNode, Pipeline

from multiscale_dali.constants import DEFAULT_HW_DECODER_LOAD
from multiscale_dali.pipelines.dali.graph import (
    READER_NAME,
    GraphSpec,
    Placement,
    decode_crop,
    placement_for,
    random_flip,
    read_input,
    resize_cascade,
    scale_sizes,
)


@pipeline_def
def multiscale_pipeline(graph: GraphSpec) -> tuple[DataNode, ...]:
    """Every scale slot (smallest first), then the padded-list positions the loader maps to labels
    (labels, when the graph reads shards)."""
    encoded, positions = read_input(graph)
    crop = decode_crop(encoded, graph)
    flip = random_flip(graph)
    return (*resize_cascade(crop, scale_sizes(graph), flip, graph.train_augment), positions)


@pipeline_def
def _decode_only(files: tuple[str, ...], placement: Placement) -> tuple[DataNode, DataNode]:
    encoded, labels = fn.readers.file(files=list(files), name=READER_NAME)
    return fn.decoders.image(encoded, **placement.decoder_args), labels


def decode_only_pipeline(
    *,
    files: Sequence[str],
    batch_size: int,
    num_threads: int = 2,
    device: str = "cpu",
    hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD,
) -> Pipeline:
    """A built read + decode pipeline: the throughput ceiling the multi-scale graph is measured against.

    Decoded images keep their own sizes, so run it with ``pipe.run()`` rather than a dense iterator.
    """
    placement = placement_for(device, hw_decoder_load=hw_decoder_load)
    pipe = _decode_only(
        tuple(files),
        placement,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=placement.device_id,
    )
    pipe.build()
    return pipe
