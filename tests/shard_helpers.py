"""A tiny packed dataset for the shard tests, and a plain-tarfile reading of what a pack holds."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from conftest import make_jpeg_folder
from multiscale_dali.data.discovery import DatasetSplits, SplitFiles
from multiscale_dali.data.shard_format import Manifest
from multiscale_dali.data.shards import pack_dataset

# Three classes of eleven JPEGs (about 1-2 KB each): 33 samples; 16 KiB shards hold three samples
# each, so every split spans several tars and reader blocks cross tar boundaries.
CLASSES, PER_CLASS = 3, 11
SMALL_SHARD_BYTES = 16 * 1024


@dataclass(frozen=True)
class PackedSample:
    key: str
    image: bytes
    label: int
    label_raw: bytes
    shard: str


def train_only_splits(root: Path) -> DatasetSplits:
    """All images of a fresh folder in the train split (val and test empty)."""
    files, labels = make_jpeg_folder(root, classes=CLASSES, per_class=PER_CLASS, sizes=((40, 32), (36, 44), (48, 48)))
    empty = SplitFiles(files=(), labels=())
    return DatasetSplits(root=str(root), classes=tuple(f"class_{k}" for k in range(CLASSES)),
                         train=SplitFiles(files=tuple(files), labels=tuple(labels)), val=empty, test=empty,
                         explicit_splits=False)


def read_split(manifest: Manifest, split: str) -> list[PackedSample]:
    """Every sample of ``split`` in stored order, read member by member with tarfile."""
    samples: list[PackedSample] = []
    for path in manifest.shard_paths(split):
        with tarfile.open(path) as archive:
            members = archive.getmembers()
            assert len(members) % 3 == 0, f"{path} holds {len(members)} members, not triples"
            for jpg, cls, lbl in zip(members[0::3], members[1::3], members[2::3]):
                key = jpg.name.split(".")[0]
                assert [jpg.name, cls.name, lbl.name] == [f"{key}.jpg", f"{key}.cls", f"{key}.lbl"]
                samples.append(PackedSample(key=key, image=archive.extractfile(jpg).read(),
                                            label=int(archive.extractfile(cls).read()),
                                            label_raw=archive.extractfile(lbl).read(), shard=path.name))
    return samples


def pack_one_class_per_image(root: Path, count: int) -> Manifest:
    """``count`` images packed into a train split as ``count`` classes, so a label names its sample;
    about two samples per tar, so reader blocks and batches cross tar boundaries."""
    files, _ = make_jpeg_folder(root / "images", classes=count, per_class=1)
    empty = SplitFiles(files=(), labels=())
    splits = DatasetSplits(root=str(root / "images"), classes=tuple(f"class_{k:02d}" for k in range(count)),
                           train=SplitFiles(files=tuple(files), labels=tuple(range(count))), val=empty, test=empty,
                           explicit_splits=False)
    manifest = pack_dataset(splits=splits, out=root / "pack", seed=1, shard_bytes=8 * 1024, workers=1)
    assert len(manifest.split("train").shards) > 2
    return manifest
