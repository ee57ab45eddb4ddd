"""Check a pack against its manifest before a long run trusts it (``msdali pack --verify``).

DALI stops a whole run on the first unreadable sample and names no tar member, so a damaged shard
is better found up front. Two depths:

* shallow (``deep=False``, reads only the small index files): every shard and index file exists,
  each shard has the size the manifest says, each index parses, lists the manifest's number of
  samples, each with one ``.jpg``, ``.cls`` and ``.lbl`` member, and points inside its shard;
* deep (``deep=True``, reads every byte once): additionally the sha256 of every shard, and a walk
  through the tar itself: members in the expected order and keys, both label members agreeing,
  labels within the classes, index offsets matching the tar, class counts matching the manifest.
  A truncated or corrupt tar is reported with the shard and the key where reading stopped.

Problems raise :class:`~multiscale_dali.data.shard_format.ShardError` with one line naming the
shard (and the key, when one is involved). No image is decoded: the sha256 proves the bytes are
those the packer wrote from images the scan had accepted.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from multiscale_dali.data.shard_format import (
    LABEL_RAW_BYTES,
    MEMBER_EXTS,
    LABEL_RAW_EXT,
    LABEL_TEXT_EXT,
    Manifest,
    ShardError,
    ShardInfo,
    parse_index,
    sample_key,
)

__all__ = ["VerifyResult", "verify_shards"]

logger = logging.getLogger(__name__)

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify_shards` checked (it raises on the first problem instead of returning)."""

    shards: int
    samples: int
    deep: bool


def verify_shards(manifest: Manifest, *, deep: bool, on_progress: Callable[[int, int], None] | None = None,
                  splits: Sequence[str] | None = None) -> VerifyResult:
    """Check every shard of ``manifest`` (see the module docstring for what each depth covers);
    ``on_progress(done, total)`` counts the shards checked; ``splits`` limits the check to those."""
    shards = samples = 0
    chosen = [split for split in manifest.splits if splits is None or split.name in splits]
    total = sum(len(split.shards) for split in chosen)
    for split in chosen:
        counts = np.zeros(manifest.num_classes, dtype=np.int64)
        first = 0
        for shard in split.shards:
            # Deep checks walk the tar itself, which names the key where a damaged shard stops.
            entries = _check_index(manifest, shard, first=first, split_size=split.samples, check_size=not deep)
            if deep:
                counts += _check_tar(manifest, shard, entries)
            first += shard.samples
            shards += 1
            samples += shard.samples
            if on_progress is not None:
                on_progress(shards, total)
        if deep and tuple(int(c) for c in counts) != split.class_counts:
            raise ShardError(f"{manifest.directory}: split {split.name} holds class counts {counts.tolist()}, "
                             f"the manifest says {list(split.class_counts)}")
    logger.info("verified %d shard(s), %d samples in %s (%s)", shards, samples, manifest.directory,
                "deep" if deep else "shallow")
    return VerifyResult(shards=shards, samples=samples, deep=deep)


def _check_index(manifest: Manifest, shard: ShardInfo, *, first: int, split_size: int,
                 check_size: bool) -> list[list[tuple[str, int, int, str]]]:
    tar_path = manifest.directory / shard.name
    index_path = manifest.directory / shard.index
    try:
        size = tar_path.stat().st_size
        text = index_path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardError(f"cannot read shard {tar_path.name} or its index: {exc}") from None
    if check_size and size != shard.bytes:
        raise ShardError(f"shard {tar_path} has {size} bytes, the manifest says {shard.bytes} (truncated or replaced)")
    entries = parse_index(text, source=str(index_path))
    if len(entries) != shard.samples:
        raise ShardError(f"index {index_path} lists {len(entries)} samples, the manifest says {shard.samples}")
    for position, entry in enumerate(entries, start=first):
        key = sample_key(position, split_size)
        if [(ext, name) for ext, _, _, name in entry] != [(ext, f"{key}.{ext}") for ext in MEMBER_EXTS]:
            raise ShardError(f"index {index_path}: sample {key} does not list members "
                             f"{', '.join(f'{key}.{e}' for e in MEMBER_EXTS)} in that order")
        if check_size and any(offset < 0 or offset + length > size for _, offset, length, _ in entry):
            raise ShardError(f"index {index_path}: sample {key} points beyond the end of {tar_path.name}")
    return entries


class _HashingReader:
    """A read-only stream over a file that hashes every byte read through it."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.sha256.update(data)
        self.offset += len(data)
        return data

    def drain(self) -> None:
        while self.read(_READ_BLOCK):
            pass


def _check_tar(manifest: Manifest, shard: ShardInfo, entries: list[list[tuple[str, int, int, str]]]) -> np.ndarray:
    """Walk the tar once (streaming, hashing as it goes); the shard's per-class counts."""
    path = manifest.directory / shard.name
    counts = np.zeros(manifest.num_classes, dtype=np.int64)
    last_key = "(none: the first sample)"
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        members = _members(reader, path)
        try:
            for entry in entries:
                key = entry[0][3].split(".", 1)[0]
                data = {}
                for ext, offset, size, name in entry:
                    member, payload = next(members, (None, b""))
                    if member is None:
                        raise ShardError(f"shard {path} ends before member {name} (last complete key {last_key})")
                    if member.name != name or member.offset_data != offset or member.size != size:
                        raise ShardError(f"shard {path} holds {member.name} ({member.size} bytes at "
                                         f"{member.offset_data}) where its index lists {name} ({size} bytes at {offset})")
                    data[ext] = payload
                counts[_label(data, manifest.num_classes, path, key)] += 1
                last_key = key
            extra, _ = next(members, (None, b""))
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ShardError(f"shard {path} is truncated or corrupt after key {last_key}: {exc}") from None
        if extra is not None:
            raise ShardError(f"shard {path} holds member {extra.name} after the last indexed sample")
        reader.drain()
    if reader.sha256.hexdigest() != shard.sha256:
        raise ShardError(f"shard {path} fails its checksum (sha256 {reader.sha256.hexdigest()}, "
                         f"the manifest says {shard.sha256}): it changed after packing")
    return counts


def _members(reader: _HashingReader, path: Path) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """Regular members of a tar in order, with their data (a non-regular member is an error)."""
    with tarfile.open(fileobj=reader, mode="r|") as archive:
        for member in archive:
            if not member.isreg():
                raise ShardError(f"shard {path} holds {member.name}, which is not a regular file")
            extracted = archive.extractfile(member)
            yield member, extracted.read() if extracted is not None else b""


def _label(data: dict[str, bytes], num_classes: int, path: Path, key: str) -> int:
    text, raw = data.get(LABEL_TEXT_EXT, b""), data.get(LABEL_RAW_EXT, b"")
    try:
        label = int(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"shard {path}: sample {key} has label text {text[:20]!r}, not a decimal integer") from None
    if len(raw) != LABEL_RAW_BYTES or int(np.frombuffer(raw, dtype="<i8")[0]) != label:
        raise ShardError(f"shard {path}: sample {key} has .{LABEL_RAW_EXT} {raw!r}, which disagrees with "
                         f".{LABEL_TEXT_EXT} {label}")
    if not 0 <= label < num_classes:
        raise ShardError(f"shard {path}: sample {key} has label {label}, outside 0..{num_classes - 1}")
    return label
