"""Loaders over a pack's shards on several ranks: every sample counts once per epoch, in equal steps."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from multiscale_dali.pipelines.factory import build_loader, dali_installed
from multiscale_dali.pipelines.schedule import constant_schedule
from multiscale_dali.pipelines.spec import LoaderSpec, ShardSource
from shard_helpers import pack_one_class_per_image

BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not dali_installed(), reason="needs DALI")), "torchvision"]
SAMPLES, RANKS = 13, 3  # blocks of 4, 4 and 5 samples: two ranks pad every epoch, which two changes


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ShardSource:
    manifest = pack_one_class_per_image(tmp_path_factory.mktemp("ranks"), SAMPLES)
    return ShardSource(manifest=manifest, split="train", shuffle_buffer=3)


def _epochs(backend: str, source: ShardSource, *, rank: int, train: bool, batch_size: int) -> list[list]:
    spec = LoaderSpec(files=(), labels=(), shards=source, schedule=constant_schedule([16]), batch_size=batch_size,
                      train=train, seed=2, num_workers=2 if backend == "torchvision" else 1, shard_id=rank,
                      num_shards=RANKS)
    loader = build_loader(spec, backend=backend)
    try:
        return [list(loader.epoch(epoch)) for epoch in range(RANKS)]
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_sample_counts_once_per_epoch_over_the_ranks(source, backend, train):
    batch_size = 2
    ranks = [_epochs(backend, source, rank=rank, train=train, batch_size=batch_size) for rank in range(RANKS)]
    steps = {len(epoch) for rank in ranks for epoch in rank}
    assert steps == {3}  # ceil(ceil(13 / 3) / 2) on every rank and epoch: no rank waits for another
    blocks = []
    for epoch in range(RANKS):
        counted: Counter = Counter()
        for rank in ranks:
            valid = [b.labels[b.valid if b.valid is not None else torch.ones_like(b.labels, dtype=torch.bool)]
                     for b in rank[epoch]]
            counted.update(torch.cat(valid).tolist())
        assert counted == Counter(range(SAMPLES)), f"epoch {epoch}"  # labels name the samples
        blocks.append([frozenset(torch.cat([b.labels for b in rank[epoch]]).tolist()) for rank in ranks])
    # Training moves every rank one block on per epoch; evaluation reads the same block every epoch.
    assert (blocks[0] != blocks[1]) if train else (blocks[0] == blocks[1] == blocks[2])
