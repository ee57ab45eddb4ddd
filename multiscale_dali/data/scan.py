"""Vet every image file before training, because DALI cannot skip a bad one at run time.

A DALI pipeline stops the whole run on the first file it cannot decode (a truncated JPEG, a
zero-byte file, text renamed to ``.jpg``), and it has no pixel cap, so a decompression bomb
exhausts memory instead of failing. This module decides, per file and by content (magic bytes
plus a full Pillow decode), whether both backends can read it, before any pipeline is built:

* ``ok``: decodes as is;
* ``converted``: decodes, but the pixels are converted to 8-bit RGB on the way (grayscale, CMYK,
  palette, alpha dropped, 16-bit); ``note`` says how;
* ``bad``: must not reach a loader; ``reason`` says why;
* ``ignored`` (:func:`scan_tree` only): a file whose extension is not an image extension, which
  dataset discovery never hands to a loader; listed so that stray files are visible, never fatal.

A successful Pillow decode is necessary but not sufficient, because Pillow is more lenient than
the libraries inside DALI. Checked against DALI 2.4's CPU decoder, these pass Pillow and fail (or
decode differently) in DALI, so the scan rejects them:

* a PNG cut before, or with a damaged, IEND chunk (Pillow stops reading after the pixel data):
  every chunk's CRC and the final IEND are checked;
* a JPEG with stray bytes between header segments (libjpeg skips them, DALI's parser does not):
  the segment layout up to the image data is walked;
* TIFFs with malformed tags, also in a later page (Pillow warns and guesses, libtiff refuses):
  TIFFs are decoded through libtiff and Pillow's tag warnings count as failures; a 1-bit TIFF
  without a BitsPerSample tag (as Pillow writes it) is refused;
* an image with a side over ``MAX_IMAGE_SIDE`` (libpng's and OpenCV's limits);
* pixel formats outside an allow-list of (format, mode) pairs: a float TIFF decodes to a
  saturated image in DALI, a grayscale+alpha TIFF is misread as RGB.

A fuzz test (random byte damage to each format) checks that DALI decodes every file the scan
accepts.

Verdicts can be cached in a JSON manifest keyed by (absolute path, size, mtime_ns, pixel limit),
so re-running a training job re-decodes only files that changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import PIL
from PIL import Image, ImageFile, TiffImagePlugin, features

from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.fileio import atomic_write_text
from multiscale_dali.constants import DEFAULT_MAX_PIXELS
from multiscale_dali.data.discovery import is_image_file

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SCAN_WORKERS",
    "MAX_IMAGE_SIDE",
    "SCAN_RULES_VERSION",
    "ReportKind",
    "KIND_OK",
    "KIND_CONVERTED",
    "KIND_BAD",
    "KIND_IGNORED",
    "REASON_EMPTY",
    "REASON_UNREADABLE",
    "REASON_NOT_IMAGE",
    "REASON_UNSUPPORTED_FORMAT",
    "REASON_UNSUPPORTED_MODE",
    "REASON_BOMB",
    "REASON_CORRUPT",
    "REASON_NOT_IMAGE_EXTENSION",
    "FileReport",
    "ScanResult",
    "BadImagesError",
    "scan_files",
    "scan_tree",
    "filter_good",
    "effective_max_pixels",
]

logger = logging.getLogger(__name__)

# Pillow's own default for ``Image.MAX_IMAGE_PIXELS`` (1024 * 1024 * 1024 // 4 // 3), i.e. about
# 0.25 GiB of 24-bit pixels: large enough for any real photograph, small enough to stop a bomb.
# Longest side DALI's CPU decoders accept whatever the pixel count: libpng's default user limit
# is 1,000,000 and OpenCV's (DALI's WebP/TIFF fallback) 2**20. Only a corrupt or crafted header
# claims more (seen: a WebP of 2,031,664 x 40 that Pillow decodes and DALI refuses).
MAX_IMAGE_SIDE: int = 1_000_000
# Pillow releases the GIL while decoding, so threads overlap decodes; two matches the 2-core
# machines this project targets and leaves a scan from hogging a shared training node.
DEFAULT_SCAN_WORKERS: int = 2
# Bad files are logged one by one up to this many; the rest are counted (a broken dataset can
# have thousands and the log must stay readable).
MAX_LOGGED_PROBLEMS: int = 20
# Enough leading bytes for every signature below (WebP needs 12: "RIFF" <size> "WEBP").
_SNIFF_BYTES: int = 16
# Bump when the verdict rules change, so that a manifest written by older rules is not trusted.
SCAN_RULES_VERSION: int = 1
_MANIFEST_FORMAT: str = "multiscale_dali.data.scan/manifest"

ReportKind = Literal["ok", "converted", "bad", "ignored"]
KIND_OK: ReportKind = "ok"
KIND_CONVERTED: ReportKind = "converted"
KIND_BAD: ReportKind = "bad"
KIND_IGNORED: ReportKind = "ignored"
_KINDS: frozenset[str] = frozenset((KIND_OK, KIND_CONVERTED, KIND_BAD, KIND_IGNORED))

# ``reason`` always starts with one of these, followed by ": <details>", so callers and tests can
# branch on the category while people read the details.
REASON_EMPTY = "empty file"
REASON_UNREADABLE = "unreadable"
REASON_NOT_IMAGE = "not an image"
REASON_UNSUPPORTED_FORMAT = "unsupported format"
REASON_UNSUPPORTED_MODE = "unsupported pixel format"
REASON_BOMB = "decompression bomb"
REASON_CORRUPT = "truncated or corrupt"
REASON_NOT_IMAGE_EXTENSION = "not an image extension"

# The format an extension promises; content that differs gets a note ("PNG content named .jpg"):
# harmless, since both backends sniff content, but a sign of a sloppy export.
_EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP",
    ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}

# Pillow format name -> pixel modes that both Pillow and DALI's CPU decoder turn into the same
# 8-bit RGB image (checked on DALI 2.4 / Pillow 13). Missing on purpose: "F" and "I" (32-bit
# float/int; DALI saturates them), TIFF "LA" (DALI reads the two samples as if they were RGB).
_SUPPORTED_MODES: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"L", "RGB", "CMYK"}),
    "PNG": frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16"}),
    "BMP": frozenset({"1", "L", "P", "RGB", "RGBA"}),
    "TIFF": frozenset({"1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I;16B"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}
_SUPPORTED_FORMATS: tuple[str, ...] = tuple(_SUPPORTED_MODES)

# Pixel mode -> what happens to it on the way to RGB (kind "converted").
_MODE_NOTES: dict[str, str] = {
    "1": "1-bit, converted to RGB",
    "L": "grayscale, converted to RGB",
    "LA": "grayscale with alpha, alpha dropped",
    "P": "palette, converted to RGB",
    "PA": "palette with alpha, alpha dropped",
    "RGBA": "RGBA, alpha dropped",
    "CMYK": "CMYK, converted to RGB",
    # Pillow's convert("RGB") clips 16-bit gray values at 255 while DALI rescales them to 8 bits:
    # the image is usable, but a Pillow-based loader sees different pixels than DALI.
    "I;16": "16-bit grayscale (Pillow's convert('RGB') clips at 255; DALI and torchvision.io rescale)",
    "I;16B": "16-bit grayscale (Pillow's convert('RGB') clips at 255; DALI and torchvision.io rescale)",
}
NOTE_16_BIT = "16-bit, reduced to 8 bits"
# Formats whose per-channel 16-bit samples Pillow silently reduces to 8 bits (visible only in the
# tile's raw mode, e.g. "RGB;16B"); BMP's "BGR;16" means 16 bits per *pixel*, so it is excluded.
_SIXTEEN_BIT_FORMATS: frozenset[str] = frozenset({"PNG", "TIFF"})

# TIFF tag numbers used below.
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLES_PER_PIXEL = 277
# PNG chunk layout: 4-byte length, 4-byte type, data, 4-byte CRC of type + data.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK_HEADER_BYTES = 8
_PNG_CRC_BYTES = 4
_PNG_CRC_BLOCK_BYTES = 1 << 20
# JPEG markers: every header segment starts with 0xFF <marker>; 0xFF bytes may pad between
# segments; the image data follows the start-of-scan segment.
_JPEG_MARKER_PREFIX = 0xFF
_JPEG_SOI = 0xD8
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_JPEG_STANDALONE_MARKERS: frozenset[int] = frozenset({0x01, *range(0xD0, 0xD8), _JPEG_SOI, _JPEG_EOI})
_EXIF_ORIENTATION = 0x0112
_EXIF_UPRIGHT = 1
# Pillow applies the EXIF orientation itself only for TIFF; DALI applies it for every format.
_PILLOW_AUTO_ORIENTED_FORMATS: frozenset[str] = frozenset({"TIFF"})
# Pillow wheels ship libtiff; a build without it falls back to Pillow's own, more lenient reader.
_HAVE_LIBTIFF: bool = bool(features.check_codec("libtiff"))

# Signatures we recognise but do not accept, so the reason can name the format instead of
# saying "not an image". DALI (or nvImageCodec) decodes some of these, Pillow others; none both.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
)
_ISO_BMFF_BRANDS: dict[bytes, str] = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC",
                                      b"mif1": "HEIF", b"msf1": "HEIF"}


class BadImagesError(UserError, ValueError, exit_code=EXIT_FAILURE, hint="Or train without them: --on-bad-file skip."):
    """Raised by :meth:`ScanResult.raise_for_bad`; the message names the bad files and reasons."""


@dataclass(frozen=True)
class FileReport:
    """The verdict on one file. ``path`` is absolute; ``format`` is the content's format (Pillow's
    name, e.g. ``"PNG"``), whatever the extension says; ``width``/``height`` are the stored
    dimensions (0 when unknown)."""

    path: str
    kind: ReportKind
    reason: str = ""  # "" unless kind is "bad" or "ignored"
    note: str = ""  # "; "-joined remarks on a usable file, e.g. "CMYK, converted to RGB"
    format: str = ""
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"{self.path}: unknown report kind {self.kind!r}; expected one of {sorted(_KINDS)}")

    @property
    def ok(self) -> bool:
        """True when the file may be handed to a loader (kind ``ok`` or ``converted``)."""
        return self.kind in (KIND_OK, KIND_CONVERTED)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileReport:
        return cls(
            path=str(data["path"]),
            kind=data["kind"],
            reason=str(data.get("reason", "")),
            note=str(data.get("note", "")),
            format=str(data.get("format", "")),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
        )


@dataclass(frozen=True)
class ScanResult:
    """All reports of one scan, in input order (:func:`scan_files`) or path order (:func:`scan_tree`).

    ``empty_dirs`` lists folders holding no image file and no subfolder (from :func:`scan_tree`);
    ``cached_count`` is how many verdicts came from the manifest without opening the file.
    """

    reports: tuple[FileReport, ...]
    empty_dirs: tuple[str, ...] = ()
    cached_count: int = 0

    @property
    def bad(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_BAD)

    @property
    def converted(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_CONVERTED)

    @property
    def ignored(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_IGNORED)

    @property
    def good_paths(self) -> frozenset[str]:
        """Absolute paths of the files a loader may read (kind ``ok`` or ``converted``)."""
        return frozenset(r.path for r in self.reports if r.ok)

    @property
    def ok(self) -> bool:
        """No bad file. Ignored files and empty folders are not errors at this level: whether an
        empty class folder is fatal is the dataset layout's decision."""
        return not self.bad

    def counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in (KIND_OK, KIND_CONVERTED, KIND_BAD, KIND_IGNORED)}
        for report in self.reports:
            counts[report.kind] += 1
        return counts

    def describe_bad(self, *, limit: int = MAX_LOGGED_PROBLEMS) -> str:
        """One line per bad file (``path: reason``), at most ``limit`` of them, then a count."""
        bad = self.bad
        lines = [f"{r.path}: {r.reason}" for r in bad[:limit]]
        if len(bad) > limit:
            lines.append(f"... and {len(bad) - limit} more bad file(s)")
        return "\n".join(lines)

    def raise_for_bad(self) -> None:
        """Raise :class:`BadImagesError` naming every bad file (up to a limit) if there is one."""
        if self.bad:
            raise BadImagesError(
                f"{len(self.bad)} file(s) cannot be decoded by every backend; fix or remove them "
                f"(or filter them out with filter_good):\n{self.describe_bad()}"
            )

    def to_json(self, *, indent: int | None = 2) -> str:
        payload = {
            "reports": [r.to_dict() for r in self.reports],
            "empty_dirs": list(self.empty_dirs),
            "cached_count": self.cached_count,
            "counts": self.counts(),
        }
        return json.dumps(payload, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScanResult:
        payload = json.loads(text)
        return cls(
            reports=tuple(FileReport.from_dict(r) for r in payload["reports"]),
            empty_dirs=tuple(payload.get("empty_dirs", ())),
            cached_count=int(payload.get("cached_count", 0)),
        )


@dataclass(frozen=True)
class _Verdict:
    report: FileReport
    # I/O errors (permissions, a file vanishing mid-scan) may be transient: never cache them.
    cacheable: bool = True


@dataclass
class _Manifest:
    """The on-disk cache: absolute path -> stat key and report."""

    path: Path | None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> _Manifest:
        if path is None or not path.exists():
            return cls(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable scan cache %s (%s); rescanning every file", path, exc)
            return cls(path)
        if not isinstance(payload, dict) or payload.get("format") != _MANIFEST_FORMAT:
            logger.warning("ignoring %s: not a scan manifest; rescanning every file", path)
            return cls(path)
        # A verdict is only as good as the rules and the decoder that produced it.
        if payload.get("rules_version") != SCAN_RULES_VERSION or payload.get("pillow") != PIL.__version__:
            logger.info("scan cache %s was written by other rules or Pillow version; rescanning", path)
            return cls(path)
        entries = payload.get("entries")
        return cls(path, dict(entries) if isinstance(entries, dict) else {})

    def lookup(self, abs_path: str, key: tuple[int, int, int]) -> FileReport | None:
        entry = self.entries.get(abs_path)
        if entry is None or tuple(entry.get("key", ())) != key:
            return None
        try:
            return FileReport.from_dict(entry["report"])
        except (KeyError, TypeError, ValueError):
            return None

    def store(self, abs_path: str, key: tuple[int, int, int], report: FileReport) -> None:
        self.entries[abs_path] = {"key": list(key), "report": report.to_dict()}

    def save(self) -> None:
        if self.path is None:
            return
        # Entries of files scanned by an earlier call (e.g. another split) are kept so that one
        # manifest can serve several scans, but files that no longer exist are dropped so the
        # manifest does not grow forever.
        entries = {p: e for p, e in sorted(self.entries.items()) if os.path.exists(p)}
        payload = {
            "format": _MANIFEST_FORMAT,
            "rules_version": SCAN_RULES_VERSION,
            "pillow": PIL.__version__,
            "entries": entries,
        }
        try:
            atomic_write_text(self.path, json.dumps(payload, indent=1, sort_keys=True))
        except OSError as exc:
            # The cache is an optimisation: failing to write it must not fail the scan.
            logger.warning("could not write scan cache %s: %s", self.path, exc)


def effective_max_pixels(max_pixels: int) -> int:
    """The pixel limit a scan really applies: ``max_pixels``, capped by Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (when set) because Pillow refuses larger images at open time, and
    the torchvision backend decodes with Pillow. Raise both to accept larger images."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, int(pillow_limit))


def scan_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_path: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_SCAN_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Check each file by content, whatever its extension, and return one report per file.

    A file is ``bad`` when it is empty, unreadable, not an image, of a format outside JPEG / PNG /
    BMP / TIFF / WebP, of a pixel format the backends disagree on, larger than the pixel limit
    (checked on the header, before any pixel is decoded), or truncated/corrupt (a full decode
    fails). Duplicate paths are reported once. With ``cache_path``, verdicts of files whose
    (size, mtime_ns, pixel limit) are unchanged are reused without opening the file, and the
    manifest is rewritten atomically. ``on_progress(done, total)`` follows the files that are
    actually decoded (a progress bar for a first scan of a large dataset).

    For the duration of the call, Pillow's ``DecompressionBombWarning`` is an error and
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False; both are restored afterwards. Those are
    process-wide settings, so do not run a scan while another thread decodes with Pillow under
    different settings.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    limit = effective_max_pixels(max_pixels)
    if limit < max_pixels:
        logger.info(
            "pixel limit %d is capped at Pillow's Image.MAX_IMAGE_PIXELS = %d; raise that too to accept larger images",
            max_pixels, limit,
        )
    abs_paths = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    manifest = _Manifest.load(Path(cache_path) if cache_path is not None else None)

    reports: dict[str, FileReport] = {}
    to_check: list[tuple[str, tuple[int, int, int]]] = []
    cached_count = 0
    for abs_path in abs_paths:
        try:
            st = os.stat(abs_path)
        except OSError as exc:
            reports[abs_path] = _bad(abs_path, REASON_UNREADABLE, exc.strerror or str(exc))
            continue
        key = (st.st_size, st.st_mtime_ns, limit)
        cached = manifest.lookup(abs_path, key)
        if cached is not None:
            reports[abs_path] = cached
            cached_count += 1
        else:
            to_check.append((abs_path, key))

    def check(item: tuple[str, tuple[int, int, int]]) -> _Verdict:
        return _check_file(item[0], max_pixels=limit)

    verdicts: list[_Verdict] = []
    with _strict_pillow():
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            # map() yields in order on this thread, so the progress callback never runs concurrently.
            for verdict in (map(check, to_check) if workers == 1 else pool.map(check, to_check)):
                verdicts.append(verdict)
                if on_progress is not None:
                    on_progress(len(verdicts), len(to_check))

    for (abs_path, key), verdict in zip(to_check, verdicts):
        reports[abs_path] = verdict.report
        if verdict.cacheable:
            manifest.store(abs_path, key, verdict.report)
    if to_check:
        manifest.save()

    result = ScanResult(reports=tuple(reports[p] for p in abs_paths), cached_count=cached_count)
    _log_summary(result)
    return result


def scan_tree(
    root: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_path: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_SCAN_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan every regular, non-hidden file below ``root`` (recursively, following symlinks like
    torchvision's ImageFolder) and report folders that hold no image file and no subfolder.

    Files with an image extension are checked by content as in :func:`scan_files`; any other file
    is reported as ``ignored`` (dataset discovery never loads it), with a note when its content
    is nevertheless an image. Reports are sorted by path.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"cannot scan {root_path}: not a directory")
    image_files: list[str] = []
    ignored: list[FileReport] = []
    empty_dirs: list[str] = []
    for dirpath, subdirs, filenames in _walk(root_path):
        has_image = False
        for name in filenames:
            path = os.path.abspath(os.path.join(dirpath, name))
            if not os.path.isfile(path):  # sockets, FIFOs, dangling symlinks
                continue
            if is_image_file(name):
                image_files.append(path)
                has_image = True
            else:
                ignored.append(_ignored_report(path))
        if not has_image and not subdirs:
            empty_dirs.append(os.path.abspath(dirpath))
    for folder in empty_dirs:
        logger.warning("empty folder (no image files, no subfolders): %s", folder)

    scanned = scan_files(image_files, max_pixels=max_pixels, cache_path=cache_path, workers=workers,
                         on_progress=on_progress)
    reports = sorted((*scanned.reports, *ignored), key=lambda r: r.path)
    return ScanResult(reports=tuple(reports), empty_dirs=tuple(sorted(empty_dirs)), cached_count=scanned.cached_count)


def filter_good(
    files: Sequence[str | os.PathLike[str]],
    labels: Sequence[int],
    result: ScanResult,
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Keep the files ``result`` marks usable, each with its own label, in the original order.

    Raises ``ValueError`` when the sequences differ in length or a file was never scanned (a
    silent keep or drop would hide a bug in the caller). Logs a warning for every label that
    loses all of its files, since the class then still exists but can never be predicted from data.
    """
    if len(files) != len(labels):
        raise ValueError(f"filter_good: {len(files)} files but {len(labels)} labels")
    scanned = {r.path for r in result.reports}
    good = result.good_paths
    kept_files: list[str] = []
    kept_labels: list[int] = []
    for file, label in zip(files, labels):
        abs_path = os.path.abspath(os.fspath(file))
        if abs_path not in scanned:
            raise ValueError(f"filter_good: {file} was not scanned; scan every file before filtering")
        if abs_path in good:
            kept_files.append(os.fspath(file))
            kept_labels.append(label)
    emptied = sorted(set(labels) - set(kept_labels))
    for label in emptied:
        lost = sum(1 for lab in labels if lab == label)
        logger.warning("label %s lost all %d of its file(s) to the scan", label, lost)
    return tuple(kept_files), tuple(kept_labels)


# --------------------------------------------------------------------------------------------
# Checking one file


def _check_file(abs_path: str, *, max_pixels: int) -> _Verdict:
    _thread_state.tag_warnings = []
    try:
        return _check_file_unguarded(abs_path, max_pixels=max_pixels)
    finally:
        for message in _pillow_tag_warnings():
            logger.debug("%s: Pillow: %s", abs_path, message)
        _thread_state.tag_warnings = None


def _check_file_unguarded(abs_path: str, *, max_pixels: int) -> _Verdict:
    try:
        with open(abs_path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        return _Verdict(_bad(abs_path, REASON_UNREADABLE, exc.strerror or str(exc)), cacheable=False)
    if not head:
        return _Verdict(_bad(abs_path, REASON_EMPTY, "0 bytes"))
    fmt = _sniff(head)
    if fmt is None:
        return _Verdict(_bad(abs_path, REASON_NOT_IMAGE, f"unrecognised content starting with {head[:8]!r}"))
    if fmt not in _SUPPORTED_MODES:
        return _Verdict(_bad(abs_path, REASON_UNSUPPORTED_FORMAT,
                             f"{fmt} content; supported: {', '.join(_SUPPORTED_FORMATS)}", fmt=fmt))
    try:
        return _Verdict(_decode(abs_path, fmt, max_pixels=max_pixels))
    except (FileNotFoundError, PermissionError) as exc:  # vanished or locked mid-scan
        return _Verdict(_bad(abs_path, REASON_UNREADABLE, exc.strerror or str(exc), fmt=fmt), cacheable=False)
    except MemoryError:
        # Says more about this machine than about the file: report it, but do not cache it.
        return _Verdict(_bad(abs_path, REASON_UNREADABLE, "out of memory while decoding", fmt=fmt), cacheable=False)
    except Exception as exc:  # noqa: BLE001
        # Pillow's plugins raise all sorts on malformed data (OSError "Truncated File Read",
        # struct.error, IndexError, ...); one odd file must not abort the scan of thousands.
        logger.debug("decoding %s failed", abs_path, exc_info=True)
        return _Verdict(_bad(abs_path, REASON_CORRUPT, _describe(exc), fmt=fmt))


def _decode(abs_path: str, fmt: str, *, max_pixels: int) -> FileReport:
    """Open lazily, check the header, then decode every pixel. Pillow errors become reports."""
    try:
        # formats=[fmt]: only the plugin matching the magic bytes may claim the file, so content
        # that merely resembles another format is not rescued by a lenient plugin.
        image = Image.open(abs_path, formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised from the header alone (the warning is an error inside _strict_pillow()).
        return _bad(abs_path, REASON_BOMB, f"{exc} (Pillow's Image.MAX_IMAGE_PIXELS)", fmt=fmt)
    except Image.UnidentifiedImageError:
        return _bad(abs_path, REASON_CORRUPT, f"{fmt} signature but Pillow cannot parse the header", fmt=fmt)
    except (ValueError, SyntaxError, EOFError) as exc:  # plugins raise these on malformed headers
        return _bad(abs_path, REASON_CORRUPT, f"bad {fmt} header: {exc}", fmt=fmt)
    with image:
        width, height = image.size
        # Image.open only read the header: reject oversized images before allocating pixels.
        if width * height > max_pixels:
            return _bad(abs_path, REASON_BOMB,
                        f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                        fmt=fmt, width=width, height=height)
        if max(width, height) > MAX_IMAGE_SIDE:
            return _bad(abs_path, REASON_BOMB,
                        f"{width}x{height} has a side longer than {MAX_IMAGE_SIDE} pixels, which DALI refuses",
                        fmt=fmt, width=width, height=height)
        mode = image.mode
        raw_mode = _raw_mode(image)
        if mode not in _SUPPORTED_MODES[fmt]:
            return _bad(abs_path, REASON_UNSUPPORTED_MODE,
                        f"{fmt} pixel mode {mode!r}; the backends would not decode it to the same RGB image",
                        fmt=fmt, width=width, height=height)
        problem = _tiff_problem(image) if fmt == "TIFF" else _jpeg_problem(abs_path) if fmt == "JPEG" else ""
        if problem:
            return FileReport(path=abs_path, kind=KIND_BAD, reason=problem, format=fmt, width=width, height=height)
        try:
            image.load()
            frames = getattr(image, "n_frames", 1)  # walks every frame header: may fail too
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - "image file is truncated", struct.error, ...
            return _bad(abs_path, REASON_CORRUPT, f"{fmt} decode failed: {_describe(exc)}", fmt=fmt,
                        width=width, height=height)
        tag_warnings = _pillow_tag_warnings()
        if fmt == "TIFF" and tag_warnings:
            # Pillow skipped or guessed malformed tags (e.g. "Tag data larger than file", also in
            # a later page's IFD); DALI's TIFF parser refuses such files.
            return _bad(abs_path, REASON_CORRUPT, f"TIFF tags: {tag_warnings[0]}", fmt=fmt, width=width, height=height)
        exif_orientation = _exif_orientation(image)
    if fmt == "PNG":
        # Pillow's load() stops after the last IDAT chunk, so it accepts a PNG cut before IEND,
        # or with a damaged IEND, that DALI (libpng) rejects.
        problem = _png_problem(abs_path)
        if problem:
            return FileReport(path=abs_path, kind=KIND_BAD, reason=problem, format=fmt, width=width, height=height)

    notes: list[str] = []
    converted = False
    if mode in _MODE_NOTES:
        notes.append(_MODE_NOTES[mode])
        converted = True
    if fmt in _SIXTEEN_BIT_FORMATS and ";16" in raw_mode and not mode.startswith("I;16"):
        notes.append(NOTE_16_BIT)
        converted = True
    extension = os.path.splitext(abs_path)[1].lower()
    if _EXTENSION_FORMATS.get(extension) != fmt:
        notes.append(f"{fmt} content named {extension or '(no extension)'}")
    if frames > 1:
        notes.append(f"{frames} frames, only the first is used")
    if exif_orientation not in (None, _EXIF_UPRIGHT) and fmt not in _PILLOW_AUTO_ORIENTED_FORMATS:
        notes.append(f"EXIF orientation {exif_orientation}: DALI applies it, Pillow only with ImageOps.exif_transpose")
    if tag_warnings:
        # Seen: DALI ignored a damaged EXIF block while torchvision.io still read its orientation,
        # so the two backends produced the image turned by 90 degrees relative to each other.
        notes.append(f"damaged EXIF block ({tag_warnings[0]}); decoders may disagree on its orientation")
    return FileReport(
        path=abs_path,
        kind=KIND_CONVERTED if converted else KIND_OK,
        note="; ".join(notes),
        format=fmt,
        width=width,
        height=height,
    )


def _sniff(head: bytes) -> str | None:
    """Pillow's format name for the magic bytes at the start of a file, or None if unknown."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BMFF_BRANDS:
        return _ISO_BMFF_BRANDS[head[8:12]]
    return None


def _tiff_problem(image: Image.Image) -> str:
    """A reason to reject a TIFF whose tags Pillow tolerates but DALI's TIFF parser does not, or ""."""
    tags = image.tag_v2  # type: ignore[attr-defined]
    bits = tags.get(_TIFF_BITS_PER_SAMPLE)
    if bits is None:
        # Pillow writes 1-bit TIFFs without this tag (the TIFF default is 1); DALI requires it.
        return f"{REASON_UNSUPPORTED_MODE}: TIFF without a BitsPerSample tag (DALI rejects it)"
    samples = tags.get(_TIFF_SAMPLES_PER_PIXEL, 1)
    count = len(bits) if isinstance(bits, tuple) else 1
    if count not in (1, samples):
        return f"{REASON_CORRUPT}: TIFF BitsPerSample has {count} values for {samples} sample(s) per pixel"
    return ""


def _png_problem(abs_path: str) -> str:
    """Walk every PNG chunk: each must be complete with a correct CRC, and the file must reach an
    empty IEND chunk. Returns a reason to reject, or "". Bytes after IEND are allowed (both
    decoders ignore them)."""
    with open(abs_path, "rb") as handle:
        handle.seek(len(_PNG_SIGNATURE))
        while True:
            header = handle.read(_PNG_CHUNK_HEADER_BYTES)
            if len(header) < _PNG_CHUNK_HEADER_BYTES:
                return f"{REASON_CORRUPT}: PNG ends without an IEND chunk"
            length = int.from_bytes(header[:4], "big")
            chunk_type = header[4:]
            crc = zlib.crc32(chunk_type)
            remaining = length
            while remaining:  # in blocks: one IDAT chunk may hold the whole image
                block = handle.read(min(remaining, _PNG_CRC_BLOCK_BYTES))
                if not block:
                    return f"{REASON_CORRUPT}: PNG ends inside its {chunk_type!r} chunk"
                crc = zlib.crc32(block, crc)
                remaining -= len(block)
            stored = handle.read(_PNG_CRC_BYTES)
            if len(stored) < _PNG_CRC_BYTES:
                return f"{REASON_CORRUPT}: PNG ends inside its {chunk_type!r} chunk"
            if int.from_bytes(stored, "big") != crc:
                return f"{REASON_CORRUPT}: PNG {chunk_type!r} chunk has a bad CRC"
            if chunk_type == b"IEND":
                return "" if length == 0 else f"{REASON_CORRUPT}: PNG IEND chunk claims {length} bytes of data"


def _jpeg_problem(abs_path: str) -> str:
    """Walk the JPEG header segments up to the image data; a reason to reject, or "".

    libjpeg (Pillow) skips stray bytes between segments with a warning on stderr that Python never
    sees, while DALI's JPEG parser rejects the file ("Invalid marker"): check the layout ourselves.
    Reads only the header, never the entropy-coded data.
    """
    with open(abs_path, "rb") as handle:
        offset = handle.seek(len(b"\xff\xd8"))  # after SOI, which _sniff has already seen
        while True:
            prefix = handle.read(1)
            if not prefix:
                return f"{REASON_CORRUPT}: JPEG header ends before the image data"
            if prefix[0] != _JPEG_MARKER_PREFIX:
                return f"{REASON_CORRUPT}: JPEG has stray byte 0x{prefix[0]:02X} instead of a marker at offset {offset}"
            marker = handle.read(1)
            offset += 2
            while marker and marker[0] == _JPEG_MARKER_PREFIX:  # fill bytes before a marker
                marker = handle.read(1)
                offset += 1
            if not marker:
                return f"{REASON_CORRUPT}: JPEG header ends before the image data"
            code = marker[0]
            if code == _JPEG_SOS:
                return ""
            if code == _JPEG_EOI:
                return f"{REASON_CORRUPT}: JPEG ends (EOI) before any image data"
            if code in _JPEG_STANDALONE_MARKERS:
                continue
            length_bytes = handle.read(2)
            if len(length_bytes) < 2:
                return f"{REASON_CORRUPT}: JPEG header ends inside a segment"
            length = int.from_bytes(length_bytes, "big")
            if length < 2:
                return f"{REASON_CORRUPT}: JPEG segment 0xFF{code:02X} at offset {offset - 2} has length {length}"
            handle.seek(length - 2, os.SEEK_CUR)
            offset += length


def _describe(exc: BaseException) -> str:
    """Pillow's message, or the exception type when the message is empty (e.g. struct.error)."""
    return str(exc) or type(exc).__name__


def _raw_mode(image: Image.Image) -> str:
    """The decoder's raw mode (e.g. ``"RGB;16B"``), which reveals 16-bit samples that Pillow
    reduces to an 8-bit ``mode``; "" when the plugin does not expose one (WebP)."""
    if not image.tile:
        return ""
    args = image.tile[0].args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _exif_orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - malformed EXIF must not turn a decodable image into "bad"
        return None
    return value if isinstance(value, int) else None


def _bad(abs_path: str, category: str, detail: str, *, fmt: str = "", width: int = 0, height: int = 0) -> FileReport:
    return FileReport(path=abs_path, kind=KIND_BAD, reason=f"{category}: {detail}", format=fmt, width=width,
                      height=height)


def _ignored_report(abs_path: str) -> FileReport:
    extension = os.path.splitext(abs_path)[1] or "(no extension)"
    note = ""
    try:
        with open(abs_path, "rb") as handle:
            fmt = _sniff(handle.read(_SNIFF_BYTES)) or ""
    except OSError:
        fmt = ""
    if fmt:
        # Cheap (magic bytes only) and worth saying: a real image with an odd extension is
        # silently left out of the dataset.
        note = f"{fmt} content, but dataset discovery skips this extension"
    return FileReport(path=abs_path, kind=KIND_IGNORED,
                      reason=f"{REASON_NOT_IMAGE_EXTENSION}: {extension}", note=note, format=fmt)


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` over non-hidden entries, following symlinks but never entering a directory
    twice (a symlink loop would otherwise recurse forever)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))


# Per worker thread: the TIFF-tag warnings Pillow raised for the file being checked.
_thread_state = threading.local()
_TIFF_PLUGIN_FILE = "TiffImagePlugin.py"


def _pillow_tag_warnings() -> list[str]:
    return list(getattr(_thread_state, "tag_warnings", None) or ())


def _capture_tag_warnings(showwarning: Any) -> Any:
    """A ``warnings.showwarning`` that files Pillow's TIFF-tag warnings under the file the
    current thread is checking, and passes everything else to ``showwarning``.

    Python 3.11's warning filters are process-wide, so they cannot tell which worker thread's
    file a warning is about; the thread-local sink can. The same tag parser reads EXIF blocks,
    so a JPEG with a corrupt EXIF block warns too: that is only logged (DALI ignores bad EXIF),
    while a TIFF's own tags are its structure, which DALI parses strictly.
    """

    def handler(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: Any = None, line: str | None = None) -> None:
        sink = getattr(_thread_state, "tag_warnings", None)
        if sink is not None and issubclass(category, UserWarning) and filename.endswith(_TIFF_PLUGIN_FILE):
            sink.append(str(message))
            return
        showwarning(message, category, filename, lineno, file, line)

    return handler


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Within the block, a DecompressionBombWarning is an error, truncated files fail to load,
    TIFFs are decoded by libtiff and Pillow's TIFF-tag warnings are collected per file.

    All are process-wide Pillow/warnings settings; they are restored on exit so the caller's
    configuration (e.g. a torchvision loader that tolerates truncation) is untouched afterwards.
    """
    previous_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    previous_libtiff = TiffImagePlugin.READ_LIBTIFF
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow warns, then guesses, when TIFF tags are malformed or point outside the file
        # ("Tag data larger than file", "Metadata Warning", "Truncated File Read"). "always", so
        # that every file's warnings reach the per-thread sink, not just the first per line.
        warnings.filterwarnings("always", category=UserWarning, module=r"PIL\.TiffImagePlugin")
        warnings.showwarning = _capture_tag_warnings(warnings.showwarning)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        # DALI decodes TIFF with libtiff; Pillow's own reader for uncompressed TIFFs shrugs off
        # broken tags (wrong types, strip counts) that libtiff refuses. Decoding through libtiff
        # makes Pillow's verdict DALI's.
        TiffImagePlugin.READ_LIBTIFF = _HAVE_LIBTIFF
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated
            TiffImagePlugin.READ_LIBTIFF = previous_libtiff


def _log_summary(result: ScanResult) -> None:
    counts = result.counts()
    logger.info(
        "scanned %d file(s): %d ok, %d converted, %d bad, %d ignored (%d verdicts from cache)",
        len(result.reports), counts[KIND_OK], counts[KIND_CONVERTED], counts[KIND_BAD], counts[KIND_IGNORED],
        result.cached_count,
    )
    bad = result.bad
    for report in bad[:MAX_LOGGED_PROBLEMS]:
        logger.warning("bad image %s: %s", report.path, report.reason)
    if len(bad) > MAX_LOGGED_PROBLEMS:
        logger.warning("... and %d more bad file(s)", len(bad) - MAX_LOGGED_PROBLEMS)
