"""Reading packed shards with plain tarfile: every sample once per epoch over ranks and workers."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from multiscale_dali.data.shard_format import Manifest, ShardError, samples_per_reader
from multiscale_dali.data.shards import pack_dataset
from multiscale_dali.pipelines.shards_torchvision import ShardIterableDataset, reader_positions
from multiscale_dali.pipelines.torchvision_backend import load_rgb
from shard_helpers import CLASSES, PER_CLASS, SMALL_SHARD_BYTES, read_split, train_only_splits

N = CLASSES * PER_CLASS


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    root = tmp_path_factory.mktemp("shards")
    splits = train_only_splits(root / "images")
    return pack_dataset(splits=splits, out=root / "pack", seed=3, shard_bytes=SMALL_SHARD_BYTES, workers=1), root


def _epoch(manifest: Manifest, *, epoch: int, num_shards: int = 1, num_workers: int = 1, train: bool = True,
           seed: int = 0, shuffle_buffer: int = 4) -> list[list[list]]:
    """``[rank][worker] -> samples`` of one epoch."""
    ranks = []
    for shard_id in range(num_shards):
        dataset = ShardIterableDataset(manifest, "train", train=train, seed=seed, shard_id=shard_id,
                                       num_shards=num_shards, shuffle_buffer=shuffle_buffer)
        ranks.append([list(dataset.iter_epoch(epoch, worker_id=w, num_workers=num_workers))
                      for w in range(num_workers)])
    return ranks


@pytest.mark.parametrize("num_shards,num_workers", [(1, 1), (2, 3), (3, 2), (4, 1), (5, 4)])
def test_every_sample_is_read_once_per_epoch_over_ranks_and_workers(packed, num_shards, num_workers):
    manifest, _ = packed
    truth = {s.key: s for s in read_split(manifest, "train")}
    for epoch in (0, 1):
        ranks = _epoch(manifest, epoch=epoch, num_shards=num_shards, num_workers=num_workers)
        valid = Counter(s.key for rank in ranks for worker in rank for s in worker if s.valid)
        assert valid == Counter(list(truth))
        for rank in ranks:
            assert sum(map(len, rank)) == samples_per_reader(N, num_shards)
            assert [len(w) for w in rank] == [len(w) for w in ranks[0]]  # same steps on every rank
        for sample in (s for rank in ranks for worker in rank for s in worker):
            assert sample.label == truth[sample.key].label and sample.image == truth[sample.key].image


def test_padding_repeats_the_last_sample_of_a_short_block_as_invalid():
    # 10 samples over 3 ranks: blocks of 3, 3 and 4; the short ones repeat their last sample.
    rank0 = reader_positions(10, shard_id=0, num_shards=3, epoch=0)
    assert rank0 == [(0, True), (1, True), (2, True), (2, False)]
    assert reader_positions(10, shard_id=2, num_shards=3, epoch=0) == [(p, True) for p in range(6, 10)]
    assert reader_positions(10, shard_id=0, num_shards=3, epoch=2) == [(p, True) for p in range(6, 10)]


def test_the_order_is_fixed_by_seed_and_epoch_and_changes_between_epochs(packed):
    manifest, _ = packed

    def keys(epoch: int, seed: int) -> list[str]:
        return [s.key for rank in _epoch(manifest, epoch=epoch, num_shards=2, num_workers=2, seed=seed)
                for worker in rank for s in worker]

    assert keys(0, seed=0) == keys(0, seed=0)
    assert keys(0, seed=0) != keys(1, seed=0)
    assert keys(0, seed=0) != keys(0, seed=1)


def test_evaluation_reads_in_packed_order(packed):
    manifest, _ = packed
    (rank,) = _epoch(manifest, epoch=0, train=False, num_workers=3)
    assert [s.key for worker in rank for s in worker] == [f"{i:08d}" for i in range(N)]


def test_a_dataloader_with_workers_reads_every_sample_once(packed):
    manifest, _ = packed
    dataset = ShardIterableDataset(manifest, "train", train=True, seed=5, shuffle_buffer=8)
    dataset.set_epoch(1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    keys = [sample.key for sample in loader]
    assert sorted(keys) == [f"{i:08d}" for i in range(N)]
    expected = [s.key for w in range(2) for s in dataset.iter_epoch(1, worker_id=w, num_workers=2)]
    assert sorted(keys) == sorted(expected) and len(dataset) == N


def test_decoded_samples_are_the_pixels_of_the_source_files(packed):
    manifest, root = packed
    by_bytes = {p.read_bytes(): p for p in (root / "images").rglob("*.jpg")}
    dataset = ShardIterableDataset(manifest, "train", train=False, decode=True)
    samples = list(dataset.iter_epoch(0))
    assert len(samples) == N
    for sample, packed_sample in zip(samples, read_split(manifest, "train")):
        assert sample.image.dtype == torch.uint8 and sample.image.shape[0] == 3
        assert torch.equal(sample.image, load_rgb(str(by_bytes[packed_sample.image])))


def test_a_damaged_shard_is_named_by_the_reader(packed, tmp_path):
    manifest, _ = packed
    copy = tmp_path / "pack"
    copy.mkdir()
    for path in manifest.directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    first = copy / manifest.split("train").shards[0].name
    first.write_bytes(first.read_bytes()[:1500])
    damaged = dataclasses.replace(manifest, directory=copy)
    with pytest.raises(ShardError, match=first.name):
        list(ShardIterableDataset(damaged, "train", train=False).iter_epoch(0))


def test_more_ranks_than_samples_is_refused(packed):
    manifest, _ = packed
    with pytest.raises(ValueError, match="fewer than"):
        ShardIterableDataset(manifest, "val", train=False)
