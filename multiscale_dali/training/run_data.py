"""The data of a run: where it lives, the pre-flight scan, splits every rank agrees on, and the loaders.

``--data`` is an ImageFolder (file lists, scanned before training) or a packed directory (detected
by its manifest; its splits are the pack's, checked against the manifest instead of scanned: the
pack scanned every image when it was made).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

from multiscale_dali.constants import DEFAULT_SPLIT_FRACTIONS, SPLIT_NAMES
from multiscale_dali.data.discovery import DataError, DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.data.packed import PackedSplit, PackedSplits, check_split_fractions, is_packed_dir, load_packed
from multiscale_dali.pipelines.augment import AutoAugmentSpec
from multiscale_dali.pipelines.factory import build_loader
from multiscale_dali.pipelines.schedule import ScaleSchedule, constant_schedule
from multiscale_dali.pipelines.spec import Loader, LoaderSpec, ShardSource
from multiscale_dali.training.config import TrainConfig
from multiscale_dali.training.distributed import DistributedContext, check_ranks_agree

log = logging.getLogger(__name__)


def dataset_root(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    from multiscale_dali.data.embedded import default_dataset

    return default_dataset(binary=config.default_dataset == "textures-binary")


def scan_cache_path(root: Path) -> Path:
    """One scan manifest per dataset root, shared by every run over it."""
    from multiscale_dali.data.embedded import default_cache_dir

    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return default_cache_dir() / "scan" / f"{digest}.json"


def vet_splits(splits: DatasetSplits, config: TrainConfig) -> DatasetSplits:
    """Pre-flight scan of every file: DALI cannot skip a bad file mid-run, so find them first.

    ``on_bad_file="error"`` raises :class:`~multiscale_dali.data.scan.BadImagesError` naming each bad
    file; ``"skip"`` trains on the good files, every label unchanged.
    """
    from multiscale_dali.data.scan import filter_good, scan_files

    if not config.scan:
        log.warning("--no-scan: the files are not checked; a bad image stops the run when a loader meets it")
        return splits
    every_file = [f for name in SPLIT_NAMES for f in splits.split(name).files]
    # One decode per file, and PIL releases the GIL while decoding: as many threads as loader workers.
    result = scan_files(every_file, max_pixels=config.max_image_pixels, workers=max(1, config.workers),
                        cache_path=scan_cache_path(Path(splits.root)))
    log.info("scanned %d files (%d from the cache): %d bad, %d converted", len(result.reports),
             result.cached_count, len(result.bad), len(result.converted))
    if result.ok:
        return splits
    if config.on_bad_file == "error":
        result.raise_for_bad()
    log.warning("--on-bad-file skip: training without %d bad file(s):\n%s", len(result.bad), result.describe_bad())
    kept = {}
    for name in SPLIT_NAMES:
        files, labels = filter_good(splits.split(name).files, splits.split(name).labels, result)
        kept[name] = SplitFiles(files=files, labels=labels)
    if not kept["train"].files:
        raise DataError(f"no readable training images left in {splits.root} after skipping bad files")
    return dataclasses.replace(splits, **kept)


def splits_fingerprint(splits: DatasetSplits) -> str:
    # Paths relative to the root: nodes may mount the same shared dataset at different places.
    # Discovery's paths are normal and below the root, so cutting the prefix gives relpath's answer
    # at a fraction of its cost (a few microseconds a file, seconds for a million).
    prefix = os.path.join(splits.root, "")
    digest = hashlib.sha256()
    for name in SPLIT_NAMES:
        split = splits.split(name)
        files = [f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, splits.root) for f in split.files]
        digest.update(json.dumps([name, files, [int(v) for v in split.labels]]).encode())
    return digest.hexdigest()


def prepare_splits(config: TrainConfig, context: DistributedContext, root: Path) -> DatasetSplits:
    """The vetted splits of ``root`` (a collective: rank 0 scans first)."""
    discovered = discover_dataset(root, fractions=config.split_fractions, seed=config.seed)
    # Rank 0 scans first and fills the manifest; the other ranks then read its verdicts instead of
    # all decoding the whole dataset at once (and raise the same error if rank 0 found bad files).
    # A first scan of a very large dataset can outlast the collective timeout: `msdali scan` once
    # before a multi-process launch fills the manifest.
    if context.is_main:
        try:
            splits = vet_splits(discovered, config)
        finally:
            context.barrier()
    else:
        context.barrier()
        splits = vet_splits(discovered, config)
    return splits


RunSplits = DatasetSplits | PackedSplits


def prepare_packed(config: TrainConfig, root: Path) -> PackedSplits:
    """The splits of the pack at ``root``, checked against its manifest.

    The check is what is cheap before a long run: every shard and index file present at its
    recorded size, every index listing the manifest's samples (``verify_shards(deep=False)``). The
    checksums and the labels inside the tars are ``msdali scan --data SHARDS``'s work.
    """
    from multiscale_dali.data.shard_verify import verify_shards

    packed = load_packed(root)
    check_split_fractions(packed.manifest, config.split_fractions, default=DEFAULT_SPLIT_FRACTIONS)
    if config.scan:
        verify_shards(packed.manifest, deep=False)
    else:
        log.warning("--no-scan: the pack in %s is not checked against its manifest", root)
    return packed


def prepare_data(config: TrainConfig, context: DistributedContext, root: Path) -> tuple[RunSplits, str]:
    """The run's splits of ``root`` (a packed directory's, or an ImageFolder's after the scan) and their
    fingerprint, the same on every rank (a collective): a hash of every file and label, or of a pack's
    manifest. Computed once here, since checkpoints and ``splits.json`` record it too (a hash of a
    million paths is not free)."""
    if is_packed_dir(root):
        packed = prepare_packed(config, root)
        fingerprint = packed.fingerprint()
        check_ranks_agree(context, "the packed dataset (a hash of its manifest)", fingerprint)
        return packed, fingerprint
    splits = prepare_splits(config, context, root)
    fingerprint = splits_fingerprint(splits)
    check_ranks_agree(context, "the dataset splits (a hash of every file and label)", fingerprint)
    return splits, fingerprint


def split_source(split: SplitFiles | PackedSplit) -> dict:
    """The ``LoaderSpec`` fields that say where a split's samples come from."""
    if isinstance(split, PackedSplit):
        return {"files": (), "labels": (), "shards": ShardSource(manifest=split.manifest, split=split.name)}
    return {"files": split.files, "labels": split.labels}


class RunLoaders:
    """The train/val/test loaders of one run (this rank's shard of each split), closed together."""

    def __init__(self, *, config: TrainConfig, context: DistributedContext, backend: str, splits: RunSplits,
                 schedule: ScaleSchedule) -> None:
        self.backend = backend
        self._config = config
        self._context = context
        self._splits = splits
        self.train = build_loader(self._spec(splits.train, schedule, train=True), backend=backend)
        # Validation covers every scale the schedule visits, so one eval pipeline serves all epochs
        # (rebuilding DALI pipelines per epoch grows device memory pools).
        eval_schedule = constant_schedule(schedule.all_scales)
        self.val = (
            build_loader(self._spec(splits.val, eval_schedule, train=False), backend=backend)
            if len(splits.val) else None
        )

    def _spec(self, split: SplitFiles | PackedSplit, schedule: ScaleSchedule, *, train: bool) -> LoaderSpec:
        config, context = self._config, self._context
        return LoaderSpec(
            **split_source(split), schedule=schedule, batch_size=config.batch_size,
            train=train, device=str(context.device), seed=config.seed, num_workers=config.workers,
            drop_last=train and len(split) > config.batch_size, channels_last=config.channels_last,
            shard_id=context.rank, num_shards=context.world_size,
            # Automatic augmentation is training-only: evaluation sees the plain centre crop.
            auto_augment=(AutoAugmentSpec(config.auto_augment, config.rand_n, config.rand_m) if train
                          else AutoAugmentSpec()),
        )

    def test(self, schedule: ScaleSchedule) -> Loader:
        return build_loader(self._spec(self._splits.test, schedule, train=False), backend=self.backend)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()
