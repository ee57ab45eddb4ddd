"""The on-disk format of a packed dataset: file names, tar members, DALI index files, the manifest.

A pack directory holds, per split, WebDataset tar shards ``<split>-000000.tar``, ... and beside each
a DALI index file ``<split>-000000.idx``, plus one ``manifest.json`` written last (a directory
without it is an unfinished pack). Every sample is three consecutive tar members sharing one key:

* ``<key>.jpg``: the image, a JPEG (the source file's bytes, or a re-encode, see ``shards``);
* ``<key>.cls``: the label as decimal ASCII text, the WebDataset convention other tools read;
* ``<key>.lbl``: the same label as one little-endian int64, for DALI. DALI's webdataset reader
  hands a member over as raw bytes (or reinterprets them with ``dtypes``), and no DALI operator
  parses decimal text; reading ``.lbl`` with ``dtypes=INT64`` yields the label in the graph with no
  Python callback.

``key`` is the sample's position in its split's packed (shuffled) order, zero-padded decimal with
no dot (DALI and ``wds2idx`` take everything after the first dot of a name as its extension), so a
member's name alone says where the sample sits in the split.

This module is the layer both readers and the packer share; it decodes no image and imports
neither torch nor DALI.
"""

from __future__ import annotations

import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from multiscale_dali import __version__
from multiscale_dali.constants import SPLIT_NAMES
from multiscale_dali.errors import UserError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "IMAGE_EXT",
    "LABEL_TEXT_EXT",
    "LABEL_RAW_EXT",
    "MEMBER_EXTS",
    "LABEL_RAW_BYTES",
    "ShardError",
    "ShardInfo",
    "SplitShards",
    "SkippedFile",
    "ReencodedFile",
    "PackScanSummary",
    "Manifest",
    "manifest_from_dict",
    "load_manifest",
    "is_packed_dir",
    "shard_name",
    "index_name",
    "is_shard_file_name",
    "sample_key",
    "key_position",
    "reader_block",
    "samples_per_reader",
    "tar_header",
    "padded_size",
    "index_text",
    "parse_index",
    "TAR_BLOCK",
    "DEFAULT_SHUFFLE_BUFFER",
]

FORMAT_NAME = "msdali-shards"
# Bump when a reader of the old format would misread the new one; load_manifest refuses newer ones.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
IMAGE_EXT, LABEL_TEXT_EXT, LABEL_RAW_EXT = "jpg", "cls", "lbl"
MEMBER_EXTS: tuple[str, str, str] = (IMAGE_EXT, LABEL_TEXT_EXT, LABEL_RAW_EXT)
LABEL_RAW_BYTES = 8  # one little-endian int64
# Samples a training reader holds for its buffer shuffle (DALI's initial_fill, the torchvision
# reader's buffer): DALI's own default, a few MB of small JPEGs, about 100 MB of ImageNet-sized ones.
DEFAULT_SHUFFLE_BUFFER = 1024

TAR_BLOCK = tarfile.BLOCKSIZE  # 512: every header and every data area is a multiple of it
# The version wds2idx (DALI's own index tool) writes: "v1.2 <samples>", then one line per sample
# of "<ext> <data offset> <size> <member name>" per member.
INDEX_VERSION = "v1.2"
MIN_KEY_DIGITS = 8
_SHARD_DIGITS = 6
_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<number>\d{%d,})\.(?P<ext>tar|idx)$" % _SHARD_DIGITS)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ShardError(UserError, ValueError):
    """A pack directory, its manifest or one of its shards cannot be used; the message names the file."""

    flag = "--data"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:0{_SHARD_DIGITS}d}.tar"


def index_name(shard: str) -> str:
    """``train-000003.tar`` -> ``train-000003.idx``."""
    return shard[: -len(".tar")] + ".idx"


def is_shard_file_name(name: str) -> bool:
    """True for the names a pack gives its shard and index files (``<split>-NNNNNN.tar|idx``)."""
    match = _SHARD_RE.match(name)
    return bool(match) and match.group("split") in SPLIT_NAMES


def sample_key(position: int, num_samples: int) -> str:
    """The member key of the sample at ``position`` of a split of ``num_samples``: fixed-width digits."""
    width = max(MIN_KEY_DIGITS, len(str(max(num_samples - 1, 0))))
    return f"{position:0{width}d}"


def key_position(key: str) -> int:
    """The inverse of :func:`sample_key`; ``ValueError`` for a key that is not all digits."""
    if not key.isdigit():
        raise ValueError(f"sample key {key!r} is not a decimal position")
    return int(key)


def reader_block(num_samples: int, block: int, num_shards: int) -> range:
    """Positions of the ``block``-th of ``num_shards`` contiguous reader blocks: DALI's sharding.

    DALI's readers give shard ``k`` the samples ``[floor(k*N/S), floor((k+1)*N/S))`` of the
    concatenated tars (checked on DALI 2.4: 10 samples over 3 shards read 3, 3 and 4), so block
    sizes differ by at most one. The torchvision shard reader uses the same blocks.
    """
    if not 0 <= block < num_shards:
        raise ValueError(f"need 0 <= block < num_shards, got {block}/{num_shards}")
    return range(block * num_samples // num_shards, (block + 1) * num_samples // num_shards)


def samples_per_reader(num_samples: int, num_shards: int) -> int:
    """Samples every reader yields per epoch, padding included: ``ceil(N / S)`` (DALI's padded size)."""
    return math.ceil(num_samples / num_shards)


def padded_size(size: int) -> int:
    """Bytes a member of ``size`` bytes of data occupies in a tar after its header (rounded up to blocks)."""
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_header(name: str, size: int) -> bytes:
    """The one 512-byte ustar header of a regular file, with fixed owner, mode and time so a pack is
    byte-for-byte reproducible."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    if len(header) != TAR_BLOCK:  # a long name would need extra header blocks; keys are short
        raise ValueError(f"tar member name {name!r} does not fit one ustar header")
    return header


def index_text(samples: Sequence[Sequence[tuple[str, int, int, str]]]) -> str:
    """A DALI index file for a shard: ``samples`` lists, per sample, ``(ext, data offset, size, name)``
    of each member in tar order. Same text as ``wds2idx`` writes for the same tar."""
    if not samples:
        raise ValueError("a shard index needs at least one sample")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines.extend(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample) for sample in samples)
    return "\n".join(lines) + "\n"


def parse_index(text: str, *, source: str) -> list[list[tuple[str, int, int, str]]]:
    """The samples of an index file written by :func:`index_text` (or ``wds2idx``); ``ShardError``
    naming ``source`` when it is malformed."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ShardError(f"{source}: not a DALI {INDEX_VERSION} index (first line {lines[0] if lines else ''!r})")
    samples: list[list[tuple[str, int, int, str]]] = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardError(f"{source}: line {number} is not groups of '<ext> <offset> <size> <name>'")
        try:
            samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
        except ValueError:
            raise ShardError(f"{source}: line {number} has a non-integer offset or size") from None
    if len(samples) != int(head[1]):
        raise ShardError(f"{source}: header announces {head[1]} samples, the file lists {len(samples)}")
    return samples


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its file name, its DALI index file, how many samples and bytes, its sha256."""

    name: str
    index: str
    samples: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if not is_shard_file_name(self.name) or not self.name.endswith(".tar"):
            raise ValueError(f"shard name {self.name!r} is not <split>-NNNNNN.tar")
        if self.index != index_name(self.name):
            raise ValueError(f"shard {self.name} has index {self.index!r}, expected {index_name(self.name)!r}")
        if self.samples < 1 or self.bytes < 1:
            raise ValueError(f"shard {self.name} claims {self.samples} samples in {self.bytes} bytes")
        if not _SHA256_RE.match(self.sha256):
            raise ValueError(f"shard {self.name} has no valid sha256 ({self.sha256!r})")


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, in read order, and its per-class sample counts."""

    name: str
    samples: int
    class_counts: tuple[int, ...]
    shards: tuple[ShardInfo, ...]

    def __post_init__(self) -> None:
        if self.name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {self.name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        in_shards = sum(s.samples for s in self.shards)
        if in_shards != self.samples or sum(self.class_counts) != self.samples:
            raise ValueError(f"split {self.name} claims {self.samples} samples, its shards hold {in_shards} "
                             f"and its class counts sum to {sum(self.class_counts)}")


@dataclass(frozen=True)
class SkippedFile:
    """A source file the scan found unusable and ``on_bad_file="skip"`` left out."""

    path: str
    reason: str


@dataclass(frozen=True)
class ReencodedFile:
    """A sample stored as a JPEG re-encode of its source (``note`` says why), not as the source bytes."""

    split: str
    key: str
    path: str
    note: str


@dataclass(frozen=True)
class PackScanSummary:
    """What the scan before packing found: ``counts`` by report kind (ok / converted / bad)."""

    max_pixels: int
    counts: tuple[tuple[str, int], ...]
    skipped: tuple[SkippedFile, ...]
    reencoded: tuple[ReencodedFile, ...]


@dataclass(frozen=True)
class Manifest:
    """A complete pack; ``directory`` is where it was loaded from (not stored in the file)."""

    directory: Path
    format_version: int
    msdali_version: str
    seed: int
    classes: tuple[str, ...]
    task: str | None
    source_root: str
    explicit_splits: bool
    shard_bytes: int
    splits: tuple[SplitShards, ...]
    scan: PackScanSummary
    # The train/val/test fractions the source was split with (None in packs of msdali before they
    # were recorded): with ``seed`` they rebuild the very splits from the source folder.
    split_fractions: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        names = tuple(s.name for s in self.splits)
        if names != SPLIT_NAMES:
            raise ValueError(f"a manifest lists splits {', '.join(SPLIT_NAMES)} in that order, got {names}")
        for split in self.splits:
            if len(split.class_counts) != len(self.classes):
                raise ValueError(f"split {split.name} has {len(split.class_counts)} class counts "
                                 f"for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitShards:
        for split in self.splits:
            if split.name == name:
                return split
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_NAMES)}")

    def shard_paths(self, split: str) -> tuple[Path, ...]:
        return tuple(self.directory / s.name for s in self.split(split).shards)

    def index_paths(self, split: str) -> tuple[Path, ...]:
        return tuple(self.directory / s.index for s in self.split(split).shards)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; :func:`manifest_from_dict` reads it back."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "msdali_version": self.msdali_version,
            "seed": self.seed,
            "classes": list(self.classes),
            "task": self.task,
            "source": {"root": self.source_root, "explicit_splits": self.explicit_splits,
                       "split_fractions": None if self.split_fractions is None else list(self.split_fractions)},
            "shard_bytes": self.shard_bytes,
            "members": {"image": IMAGE_EXT, "label_text": LABEL_TEXT_EXT, "label_int64": LABEL_RAW_EXT},
            "splits": {
                s.name: {
                    "samples": s.samples,
                    "class_counts": list(s.class_counts),
                    "shards": [{"name": x.name, "index": x.index, "samples": x.samples, "bytes": x.bytes,
                                "sha256": x.sha256} for x in s.shards],
                }
                for s in self.splits
            },
            "scan": {
                "max_pixels": self.scan.max_pixels,
                "counts": dict(self.scan.counts),
                "skipped": [{"path": f.path, "reason": f.reason} for f in self.scan.skipped],
                "reencoded": [{"split": f.split, "key": f.key, "path": f.path, "note": f.note}
                              for f in self.scan.reencoded],
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"


def manifest_from_dict(data: Mapping[str, Any], directory: Path) -> Manifest:
    """Validate and build a :class:`Manifest`; ``ShardError`` naming the manifest on any problem."""
    source = directory / MANIFEST_FILE
    if not isinstance(data, Mapping) or data.get("format") != FORMAT_NAME:
        raise ShardError(f"{source} is not an msdali shard manifest (no \"format\": \"{FORMAT_NAME}\")")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ShardError(f"{source} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ShardError(
            f"{source} was made by a newer msdali {data.get('msdali_version', '?')} (pack format {version}); "
            f"this msdali {__version__} reads format {FORMAT_VERSION} at most: upgrade msdali or re-pack"
        )
    try:
        splits = data["splits"]
        scan = data["scan"]
        if sorted(splits) != sorted(SPLIT_NAMES):
            raise ValueError(f"splits {sorted(splits)}, expected {', '.join(SPLIT_NAMES)}")
        return Manifest(
            directory=directory,
            format_version=version,
            msdali_version=str(data["msdali_version"]),
            seed=int(data["seed"]),
            classes=tuple(str(c) for c in data["classes"]),
            task=None if data.get("task") is None else str(data["task"]),
            source_root=str(data["source"]["root"]),
            explicit_splits=bool(data["source"]["explicit_splits"]),
            split_fractions=_fractions(data["source"].get("split_fractions")),
            shard_bytes=int(data["shard_bytes"]),
            splits=tuple(
                SplitShards(
                    name=name,
                    samples=int(splits[name]["samples"]),
                    class_counts=tuple(int(c) for c in splits[name]["class_counts"]),
                    shards=tuple(ShardInfo(name=str(x["name"]), index=str(x["index"]), samples=int(x["samples"]),
                                           bytes=int(x["bytes"]), sha256=str(x["sha256"]))
                                 for x in splits[name]["shards"]),
                )
                for name in SPLIT_NAMES
            ),
            scan=PackScanSummary(
                max_pixels=int(scan["max_pixels"]),
                counts=tuple(sorted((str(k), int(v)) for k, v in scan["counts"].items())),
                skipped=tuple(SkippedFile(path=str(f["path"]), reason=str(f["reason"])) for f in scan["skipped"]),
                reencoded=tuple(ReencodedFile(split=str(f["split"]), key=str(f["key"]), path=str(f["path"]),
                                              note=str(f["note"])) for f in scan["reencoded"]),
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardError(f"{source} is malformed: {type(exc).__name__}: {exc}") from None


def _fractions(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest of the pack at ``path`` (the directory or its ``manifest.json``).

    Raises :class:`ShardError` when there is no manifest (an unfinished pack), it is unreadable,
    malformed, of a newer format version, or names a shard or index file that is missing.
    """
    path = Path(path)
    directory = path.parent if path.name == MANIFEST_FILE else path
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        hint = " (an unfinished or interrupted pack: pack again)" if directory.is_dir() else ""
        raise ShardError(f"{directory} has no {MANIFEST_FILE}{hint}")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"cannot read {manifest_path}: {exc}") from None
    manifest = manifest_from_dict(data, directory)
    for split in manifest.splits:
        for shard in split.shards:
            for name in (shard.name, shard.index):
                if not (directory / name).is_file():
                    raise ShardError(f"{directory / name} is missing (listed in {manifest_path}); "
                                     f"the pack is incomplete: pack again")
    return manifest


def is_packed_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory with an msdali shard manifest (cheap: no shard is opened)."""
    manifest_path = Path(path) / MANIFEST_FILE
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME
