"""DALI's webdataset reader over a pack, on CPU (``device_id=None``): bytes, labels, layout, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402

from multiscale_dali.data.shard_format import Manifest, reader_block, samples_per_reader  # noqa: E402
from multiscale_dali.data.shards import pack_dataset  # noqa: E402
from multiscale_dali.pipelines.dali.shards import shard_reader, valid_samples  # noqa: E402
from shard_helpers import CLASSES, PER_CLASS, SMALL_SHARD_BYTES, read_split, train_only_splits  # noqa: E402

N = CLASSES * PER_CLASS


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = tmp_path_factory.mktemp("dali-shards")
    return pack_dataset(splits=train_only_splits(root / "images"), out=root / "pack", seed=3,
                        shard_bytes=SMALL_SHARD_BYTES, workers=1)


def _pipeline(manifest: Manifest, *, batch_size: int, checkpoint: bytes | None = None, **reader):
    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=17, enable_checkpointing=True)
    def read():
        return shard_reader(manifest, "train", initial_fill=5, **reader)

    pipe = read(checkpoint=checkpoint) if checkpoint is not None else read()
    pipe.build()
    return pipe


def _run(pipe, batches: int) -> list[tuple[bytes, int]]:
    samples = []
    for _ in range(batches):
        jpegs, labels = pipe.run()
        for i in range(len(jpegs)):
            label = np.array(labels[i])
            assert label.dtype == np.int64 and label.shape == (1,)
            samples.append((np.array(jpegs[i]).tobytes(), int(label[0])))
    return samples


def test_the_reader_yields_the_packed_jpegs_and_their_labels(packed):
    expected = [(s.image, s.label) for s in read_split(packed, "train")]
    pipe = _pipeline(packed, batch_size=11, train=False)
    assert _run(pipe, 3) == expected


def test_dali_reads_the_text_labels_through_our_index_files(packed):
    @pipeline_def(batch_size=N, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=[str(p) for p in packed.shard_paths("train")],
                                           index_paths=[str(p) for p in packed.index_paths("train")],
                                           ext=["jpg", "cls"], missing_component_behavior="error"))

    pipe = read()
    pipe.build()
    jpegs, classes = pipe.run()
    got = [(np.array(jpegs[i]).tobytes(), int(np.array(classes[i]).tobytes())) for i in range(N)]
    assert got == [(s.image, s.label) for s in read_split(packed, "train")]


@pytest.mark.parametrize("shuffle_tars", [False, True])
def test_readers_split_the_samples_into_blocks_and_pad_at_the_tail(packed, shuffle_tars):
    position = {s.image: int(s.key) for s in read_split(packed, "train")}
    num_shards, batch_size = 2, 5
    per_epoch = samples_per_reader(N, num_shards)
    steps = math.ceil(per_epoch / batch_size)
    seen: dict[int, list[int]] = {epoch: [] for epoch in range(3)}
    for shard_id in range(num_shards):
        pipe = _pipeline(packed, batch_size=batch_size, train=True, shard_id=shard_id, num_shards=num_shards,
                         shuffle_tars=shuffle_tars, tar_order_seed=5)
        for epoch in seen:
            read = [position[image] for image, _ in _run(pipe, steps)][:per_epoch]
            real = valid_samples(N, shard_id=shard_id, num_shards=num_shards, epoch=epoch, shuffle_tars=shuffle_tars)
            assert len(set(read[:real])) == real and set(read[real:]) <= {read[real - 1]}
            if not shuffle_tars:
                assert sorted(read[:real]) == list(reader_block(N, (shard_id + epoch) % num_shards, num_shards))
            seen[epoch] += read[:real]
    for epoch, positions in seen.items():
        assert sorted(positions) == list(range(N)), f"epoch {epoch}"


def test_a_pipeline_restored_from_a_checkpoint_replays_the_next_batches(packed):
    reader = dict(train=True, shard_id=1, num_shards=2, shuffle_tars=True, tar_order_seed=5)
    pipe = _pipeline(packed, batch_size=4, **reader)
    _run(pipe, 6)  # into the second epoch
    checkpoint = pipe.checkpoint()
    following = _run(pipe, 7)
    restored = _pipeline(packed, batch_size=4, checkpoint=checkpoint, **reader)
    assert _run(restored, 7) == following
    fresh = _pipeline(packed, batch_size=4, **reader)
    assert _run(fresh, 7) != following  # the replay is the checkpoint's doing, not the seed's


def test_a_split_smaller_than_the_reader_count_is_refused(packed):
    with pytest.raises(ValueError, match="fewer than"):
        shard_reader(packed, "val", train=False)
