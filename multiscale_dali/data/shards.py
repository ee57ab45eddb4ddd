"""Pack a dataset once into WebDataset tar shards that both backends read (``msdali pack``).

Why: a folder of millions of small files costs one open and one metadata lookup per image per
epoch, which network and parallel file systems serve slowly; a few hundred tars of ~256 MB are
read sequentially. The format is described in :mod:`multiscale_dali.data.shard_format`.

What :func:`pack_dataset` does:

1. refuses an output directory holding anything a pack does not own (so a typo cannot wipe a
   folder), before any work;
2. scans every image of every split once with the project's scan rules (:mod:`..data.scan`):
   ``bad`` files stop the pack, or are left out and listed in the manifest (``on_bad_file``);
3. orders each split by one seeded permutation (see "Shuffling" below), then writes the samples
   in that order into shards of at most ``shard_bytes`` (a single larger sample gets a shard of its
   own), each beside its DALI index file;
4. writes ``manifest.json`` last, atomically: a pack killed at any moment leaves no manifest, and
   packing again into the same directory first removes the manifest, then every stale shard,
   index and temporary file of the earlier attempt.

Bytes on the way in: a file the scan calls ``ok`` whose content is JPEG is stored byte for byte
(no generation loss; its EXIF orientation stays for the decoder to apply, as with the folder).
Every other usable file (scan kind ``converted``: CMYK, grayscale, palette, alpha, 16-bit; or a
PNG, BMP, TIFF or WebP) is decoded to the 8-bit RGB pixels the loaders see (:func:`loader_rgb`)
and re-encoded as a JPEG of quality ``REENCODE_QUALITY``, so every ``.jpg`` member really is a
JPEG that nvJPEG (and the hardware JPEG decoder) can take. The manifest lists each re-encode.

Shuffling: DALI's webdataset reader, like any streaming tar reader, shuffles only inside a buffer
of ``initial_fill`` samples that it fills sequentially: a sample can only meet samples stored
within about that distance of it, and stored order leaks into the batches (a class-sorted pack
with a 1,000-sample buffer gives batches of one or two classes). A full permutation, as the folder loaders
draw every epoch, has no such memory. So the pack applies one full, seeded permutation per split
when it writes; the readers' per-epoch buffer shuffle then only has to vary the order between
epochs, not to mix classes. The remaining difference to a per-epoch full permutation: which
samples can share a batch is limited to neighbours in the packed order (reshuffled once), and
each reader's block of samples (see ``shard_format.reader_block``) is fixed by the pack.

The packer needs neither torch nor DALI for its own work (``multiscale_dali.fileio``, used for the
atomic writes, imports torch).
"""

from __future__ import annotations

import hashlib
import io
import logging
import numbers
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from multiscale_dali import __version__
from multiscale_dali.constants import DEFAULT_MAX_PIXELS, SPLIT_NAMES, TASKS
from multiscale_dali.data.discovery import DatasetSplits
from multiscale_dali.data.scan import (
    DEFAULT_SCAN_WORKERS,
    KIND_BAD,
    KIND_CONVERTED,
    KIND_OK,
    FileReport,
    scan_files,
)
from multiscale_dali.data.shard_format import (
    FORMAT_VERSION,
    IMAGE_EXT,
    LABEL_RAW_EXT,
    LABEL_TEXT_EXT,
    MANIFEST_FILE,
    TAR_BLOCK,
    Manifest,
    PackScanSummary,
    ReencodedFile,
    ShardError,
    ShardInfo,
    SkippedFile,
    SplitShards,
    index_name,
    index_text,
    is_packed_dir,
    is_shard_file_name,
    load_manifest,
    padded_size,
    sample_key,
    shard_name,
    tar_header,
)
from multiscale_dali.data.shard_verify import VerifyResult, verify_shards
from multiscale_dali.fileio import atomic_write, atomic_write_text

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "REENCODE_QUALITY",
    "BAD_FILE_POLICIES",
    "Manifest",
    "ShardError",
    "VerifyResult",
    "pack_dataset",
    "load_manifest",
    "verify_shards",
    "is_packed_dir",
    "loader_rgb",
    "PackOutputError",
    "pack_differences",
]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
# High enough that a re-encode is visually lossless; the file then is a JPEG every decoder takes.
REENCODE_QUALITY = 95
# 4:4:4, no chroma subsampling: a re-encode should stay as close as it can to the loader's pixels,
# and re-encodes are the exception in a pack, so their extra size does not matter.
_FULL_CHROMA = 0
BAD_FILE_POLICIES: tuple[str, ...] = ("error", "skip")
# Samples read and encoded per batch of thread-pool work: bounds memory, keeps the pool busy.
_SAMPLES_PER_ROUND_PER_WORKER = 16
_END_OF_ARCHIVE = b"\0" * (2 * TAR_BLOCK)
# Temporary files of fileio.atomic_write: ".<final name>.<random>.tmp".
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]+\.tmp$")
_STREAMS = {name: i for i, name in enumerate(SPLIT_NAMES)}

ProgressCallback = Callable[[str, int, int], None]
"""``on_progress(stage, done, total)``: stage ``"scan"`` (files decoded) then ``"pack"`` (samples written)."""


class PackOutputError(ShardError, flag="--out"):
    """The output directory of a pack cannot take it (not empty, or another pack)."""


@dataclass(frozen=True)
class _Sample:
    key: str
    label: int
    image: bytes


def pack_dataset(
    *,
    splits: DatasetSplits,
    out: str | os.PathLike[str],
    seed: int,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_bad_file: Literal["error", "skip"] = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = DEFAULT_SCAN_WORKERS,
    task: str | None = None,
    scan_cache: str | os.PathLike[str] | None = None,
    on_progress: ProgressCallback | None = None,
    split_fractions: Sequence[float] | None = None,
) -> Manifest:
    """Pack the three splits of ``splits`` into ``out`` and return the manifest written there.

    ``seed`` fixes the sample order (the same inputs and seed give byte-identical shards);
    ``shard_bytes`` caps a shard's size; ``on_bad_file`` is ``"error"`` (a :class:`ShardError`
    listing the bad files, before anything is written) or ``"skip"`` (left out, listed in the
    manifest); ``max_pixels`` and ``workers`` are the scan's (``workers`` threads also read and
    re-encode); ``task`` (one of ``TASKS``, or None) is stored as given; ``scan_cache`` is the
    scan's verdict cache file; ``on_progress`` follows the scan, then the packing;
    ``split_fractions`` (the fractions ``splits`` was made with) is recorded, so that the folder's
    splits can be rebuilt from the manifest (``benchmark`` compares the two).
    """
    _check_options(seed=seed, shard_bytes=shard_bytes, on_bad_file=on_bad_file, workers=workers, task=task)
    out = Path(os.path.abspath(os.fspath(out)))
    _check_out_dir(out)

    all_files = [f for name in SPLIT_NAMES for f in splits.split(name).files]
    scan_progress = (lambda done, total: on_progress("scan", done, total)) if on_progress else None
    result = scan_files(all_files, max_pixels=max_pixels, workers=workers, cache_path=scan_cache,
                        on_progress=scan_progress)
    reports = {r.path: r for r in result.reports}
    if result.bad and on_bad_file == "error":
        raise ShardError(f"{len(result.bad)} file(s) in {splits.root} cannot be decoded by every backend; fix or "
                         f"remove them, or pack with on_bad_file='skip' to leave them out:\n{result.describe_bad()}")

    _clear_owned(out)
    total = sum(1 for f in all_files if reports[os.path.abspath(f)].ok)
    packer = _Packer(out=out, shard_bytes=shard_bytes, workers=workers, total=total, on_progress=on_progress)
    split_shards = tuple(_pack_split(packer, splits, name, reports, seed=seed) for name in SPLIT_NAMES)
    scan = PackScanSummary(
        max_pixels=max_pixels,
        counts=tuple(sorted((k, result.counts()[k]) for k in (KIND_OK, KIND_CONVERTED, KIND_BAD))),
        skipped=tuple(SkippedFile(path=r.path, reason=r.reason) for r in result.bad),
        reencoded=tuple(packer.reencoded),
    )
    manifest = Manifest(
        directory=out, format_version=FORMAT_VERSION, msdali_version=__version__, seed=int(seed),
        classes=tuple(splits.classes), task=task, source_root=splits.root, explicit_splits=splits.explicit_splits,
        shard_bytes=shard_bytes, splits=split_shards, scan=scan,
        split_fractions=None if split_fractions is None else tuple(float(f) for f in split_fractions),
    )
    # Last, and atomically: its presence is what marks the pack complete.
    atomic_write_text(out / MANIFEST_FILE, manifest.to_json())
    logger.info("packed %s into %s: %s", splits.root, out,
                ", ".join(f"{s.name} {s.samples} samples in {len(s.shards)} shard(s)" for s in split_shards))
    return manifest


def _pack_split(packer: _Packer, splits: DatasetSplits, name: str, reports: Mapping[str, FileReport], *,
                seed: int) -> SplitShards:
    """Write the usable samples of split ``name`` in their seeded order; its manifest entry."""
    split = splits.split(name)
    kept = [(f, lab) for f, lab in zip(split.files, split.labels) if reports[os.path.abspath(f)].ok]
    # One generator per split, so a split's order does not depend on the sizes of the others.
    order = np.random.default_rng([seed, _STREAMS[name]]).permutation(len(kept))
    shards = packer.write_split(name, [(reports[os.path.abspath(kept[i][0])], kept[i][1]) for i in order])
    counts = np.bincount(np.asarray([lab for _, lab in kept], dtype=np.int64), minlength=splits.num_classes)
    return SplitShards(name=name, samples=len(kept), class_counts=tuple(int(c) for c in counts), shards=tuple(shards))


def loader_rgb(path: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` pixels of an image file as the loaders see them.

    EXIF orientation applied, alpha dropped, palette/CMYK/grayscale expanded to RGB, and 16-bit
    samples reduced to their high byte (DALI and ``torchvision.io`` rescale 16 bits to 8; Pillow's
    ``convert("RGB")`` would clip 16-bit grayscale at 255 instead). Tests hold this to the
    torchvision backend's ``load_rgb`` on every kind of file the scan accepts.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _check_options(*, seed: int, shard_bytes: int, on_bad_file: str, workers: int, task: str | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # A shard must hold at least one small sample beside its end-of-archive blocks.
    minimum = 8 * TAR_BLOCK
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, numbers.Integral) or shard_bytes < minimum:
        raise ValueError(f"shard_bytes must be an integer >= {minimum}, got {shard_bytes!r}")
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {', '.join(BAD_FILE_POLICIES)}, got {on_bad_file!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} or None, got {task!r}")


def _owned(name: str) -> bool:
    """A name a pack writes: the manifest, a shard or index, or a temporary file of one of them."""
    temp = _TEMP_RE.match(name)
    final = temp.group("final") if temp else name
    return final == MANIFEST_FILE or is_shard_file_name(final)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PackOutputError(f"pack output {out} exists and is not a directory")
    if not out.exists():
        return
    foreign = sorted(e.name for e in os.scandir(out) if not (e.is_file(follow_symlinks=False) and _owned(e.name)))
    if (out / MANIFEST_FILE).is_file() and not is_packed_dir(out):
        foreign.insert(0, f"{MANIFEST_FILE} of another tool")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PackOutputError(f"pack output {out} is not empty and is not an msdali pack (it holds {shown}); "
                         f"pack into a new or empty directory")


def pack_differences(out: str | os.PathLike[str], *, source_root: str, seed: int,
                     split_fractions: Sequence[float] | None, shard_bytes: int) -> list[str]:
    """What differs between the complete pack in ``out`` and a pack with these settings.

    Empty when ``out`` holds no complete pack (nothing to protect: an unfinished pack is restarted)
    or one made from the same source with the same settings (packing again refreshes it). The
    caller decides whether replacing a different pack needs the user's word.
    """
    if not is_packed_dir(out):
        return []
    try:
        existing = load_manifest(out)
    except ShardError as err:
        return [f"its manifest does not load ({err})"]
    fractions = None if split_fractions is None else tuple(float(f) for f in split_fractions)
    wanted = {"source": os.path.abspath(source_root), "seed": int(seed), "split fractions": fractions,
              "shard bytes": int(shard_bytes)}
    held = {"source": os.path.abspath(existing.source_root), "seed": existing.seed,
            "split fractions": existing.split_fractions, "shard bytes": existing.shard_bytes}
    return [f"{name} {held[name]} (now {wanted[name]})" for name in wanted if held[name] != wanted[name]]


def _clear_owned(out: Path) -> None:
    """Remove what an earlier pack left: the manifest first, so that the directory stops claiming
    to be complete before any shard it lists disappears."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_FILE
    if manifest.exists():
        logger.info("replacing the earlier pack in %s", out)
        manifest.unlink()
    stale = sorted(e.name for e in os.scandir(out) if _owned(e.name))
    if stale:
        logger.info("removing %d file(s) of an earlier pack in %s", len(stale), out)
    for name in stale:
        (out / name).unlink()


class _HashingWriter:
    """Passes writes through to ``handle`` while hashing them and counting bytes."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self.sha256.update(data)
        self.offset += len(data)


class _Packer:
    """Reads (and where needed re-encodes) samples in parallel and writes them into shards."""

    def __init__(self, *, out: Path, shard_bytes: int, workers: int, total: int,
                 on_progress: ProgressCallback | None) -> None:
        self._out = out
        self._shard_bytes = shard_bytes
        self._workers = workers
        self._total = total
        self._on_progress = on_progress
        self._done = 0
        self.reencoded: list[ReencodedFile] = []

    def write_split(self, split: str, ordered: Sequence[tuple[FileReport, int]]) -> list[ShardInfo]:
        samples = self._samples(split, ordered)
        pending = next(samples, None)
        shards: list[ShardInfo] = []
        while pending is not None:
            writer = _ShardWriter(first=pending, rest=samples, limit=self._shard_bytes, on_sample=self._count)
            name = shard_name(split, len(shards))
            atomic_write(self._out / name, writer.write)
            atomic_write_text(self._out / index_name(name), index_text(writer.index))
            shards.append(ShardInfo(name=name, index=index_name(name), samples=len(writer.index),
                                    bytes=writer.bytes, sha256=writer.sha256))
            pending = writer.leftover
        return shards

    def _count(self) -> None:
        self._done += 1
        if self._on_progress is not None:
            self._on_progress("pack", self._done, self._total)

    def _samples(self, split: str, ordered: Sequence[tuple[FileReport, int]]) -> Iterator[_Sample]:
        """The split's samples in order; ``workers`` threads read and re-encode a round at a time."""
        step = self._workers * _SAMPLES_PER_ROUND_PER_WORKER
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="pack") as pool:
            for start in range(0, len(ordered), step):
                chunk = ordered[start : start + step]
                for position, (report, label), (image, note) in zip(
                    range(start, start + len(chunk)), chunk, pool.map(_image_bytes, (r for r, _ in chunk))
                ):
                    key = sample_key(position, len(ordered))
                    if note:
                        self.reencoded.append(ReencodedFile(split=split, key=key, path=report.path, note=note))
                    yield _Sample(key=key, label=int(label), image=image)


class _ShardWriter:
    """Writes ``first`` and then samples of ``rest`` into one tar until the next would not fit.

    After :meth:`write`: ``index`` (the DALI index entries), ``bytes``, ``sha256`` and
    ``leftover`` (the sample that opens the next shard, or None at the end of the split).
    """

    def __init__(self, *, first: _Sample, rest: Iterator[_Sample], limit: int, on_sample: Callable[[], None]) -> None:
        self._first = first
        self._rest = rest
        self._limit = limit
        self._on_sample = on_sample
        self.index: list[list[tuple[str, int, int, str]]] = []
        self.bytes = 0
        self.sha256 = ""
        self.leftover: _Sample | None = None

    def write(self, handle: BinaryIO) -> None:
        out = _HashingWriter(handle)
        sample: _Sample | None = self._first
        while sample is not None:
            members = _members(sample)
            size = sum(TAR_BLOCK + padded_size(len(data)) for _, data in members)
            if self.index and out.offset + size + len(_END_OF_ARCHIVE) > self._limit:
                self.leftover = sample
                break
            entry = []
            for name, data in members:
                out.write(tar_header(name, len(data)))
                entry.append((name.split(".", 1)[1], out.offset, len(data), name))
                out.write(data + b"\0" * (padded_size(len(data)) - len(data)))
            self.index.append(entry)
            self._on_sample()
            sample = next(self._rest, None)
        out.write(_END_OF_ARCHIVE)
        self.bytes = out.offset
        self.sha256 = out.sha256.hexdigest()


def _members(sample: _Sample) -> list[tuple[str, bytes]]:
    return [
        (f"{sample.key}.{IMAGE_EXT}", sample.image),
        (f"{sample.key}.{LABEL_TEXT_EXT}", str(sample.label).encode("ascii")),
        (f"{sample.key}.{LABEL_RAW_EXT}", np.int64(sample.label).astype("<i8").tobytes()),
    ]


def _image_bytes(report: FileReport) -> tuple[bytes, str]:
    """The bytes to store for a scanned file, and a note when they are a re-encode ("" when not)."""
    try:
        if report.kind == KIND_OK and report.format == "JPEG":
            return Path(report.path).read_bytes(), ""
        buffer = io.BytesIO()
        Image.fromarray(loader_rgb(report.path)).save(buffer, format="JPEG", quality=REENCODE_QUALITY,
                                                     subsampling=_FULL_CHROMA)
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot read {report.path} while packing (did it change since the scan?): {exc}") from exc
    why = report.note or f"{report.format} content"
    return buffer.getvalue(), f"{why}; re-encoded as JPEG q{REENCODE_QUALITY}"
