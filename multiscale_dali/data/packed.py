"""A packed directory seen as a dataset's splits: what a run needs from ``--data SHARDS``.

A run over an ImageFolder works from :class:`~multiscale_dali.data.discovery.DatasetSplits` (file
lists). A pack has no file list: its splits are fixed by the manifest, its samples live in tars.
:class:`PackedSplits` answers the same questions a run asks of ``DatasetSplits`` (classes, split
sizes, a summary for ``config.json``) from the manifest alone, and each :class:`PackedSplit` names
the split the loaders read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from multiscale_dali.constants import SPLIT_NAMES
from multiscale_dali.data.shard_format import MANIFEST_FILE, Manifest, ShardError, is_packed_dir, load_manifest

__all__ = ["PackedSplit", "PackedSplits", "load_packed", "check_split_fractions", "is_packed_dir"]


class PackedSplitsError(ShardError, flag="--split-fractions"):
    """``--split-fractions`` given for a packed directory, whose splits were fixed when it was packed."""


@dataclass(frozen=True)
class PackedSplit:
    """One split of a pack; ``len()`` is its sample count."""

    manifest: Manifest
    name: str

    def __len__(self) -> int:
        return self.manifest.split(self.name).samples


@dataclass(frozen=True)
class PackedSplits:
    """The three splits of a pack, with the attributes of ``DatasetSplits`` a run reads."""

    manifest: Manifest

    @property
    def root(self) -> str:
        return str(self.manifest.directory)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def explicit_splits(self) -> bool:
        return self.manifest.explicit_splits

    @property
    def train(self) -> PackedSplit:
        return PackedSplit(self.manifest, "train")

    @property
    def val(self) -> PackedSplit:
        return PackedSplit(self.manifest, "val")

    @property
    def test(self) -> PackedSplit:
        return PackedSplit(self.manifest, "test")

    def split(self, name: str) -> PackedSplit:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return PackedSplit(self.manifest, name)

    def fingerprint(self) -> str:
        """A hash of the manifest: ranks that read different packs disagree on it."""
        return hashlib.sha256((self.manifest.directory / MANIFEST_FILE).read_bytes()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Counts per split and per class, as ``DatasetSplits.summary`` gives them, plus the pack's origin."""
        manifest = self.manifest
        return {
            "root": self.root,
            "classes": list(manifest.classes),
            "num_classes": manifest.num_classes,
            "explicit_splits": manifest.explicit_splits,
            "splits": {s.name: {"total": s.samples, "per_class": dict(zip(manifest.classes, s.class_counts))}
                       for s in manifest.splits},
            "packed": {"source": manifest.source_root, "seed": manifest.seed, "msdali_version": manifest.msdali_version,
                       "shards": sum(len(s.shards) for s in manifest.splits)},
        }


def load_packed(path: str | Path) -> PackedSplits:
    """The splits of the pack at ``path``; :class:`ShardError` naming the file when it cannot be used."""
    return PackedSplits(load_manifest(path))


def check_split_fractions(manifest: Manifest, fractions: Sequence[float], *, default: Sequence[float]) -> None:
    """Refuse split fractions other than the default or the pack's own: a pack's splits are fixed.

    Silently training on the packed split while the user asked for another would be worse than
    stopping: the test split would not be the one they meant.
    """
    given = tuple(float(f) for f in fractions)
    if given == tuple(float(f) for f in default) or given == manifest.split_fractions:
        return
    packed = "" if manifest.split_fractions is None else f" (it was split {','.join(map(str, manifest.split_fractions))})"
    raise PackedSplitsError(
        f"{','.join(map(str, given))} cannot apply to {manifest.directory}, a packed directory whose splits were "
        f"fixed when it was packed{packed}; drop --split-fractions (and split_fractions from the recipe), or "
        f"pack the folder again with msdali pack --split-fractions"
    )
