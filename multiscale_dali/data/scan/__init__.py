"""Vet every image file before training, because DALI cannot skip a bad one at run time.

A DALI pipeline stops the whole run on the first file it cannot decode (a truncated JPEG, a
zero-byte file, text renamed to ``.jpg``), and it has no pixel cap, so a decompression bomb
exhausts memory instead of failing. This subpackage decides, per file and by content (magic bytes
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

Verdicts can be cached in a JSON manifest with one record per directory, each file keyed by (name,
size, mtime_ns) under one pixel limit, so re-running a training job re-decodes only files that
changed, and confirming an unchanged tree costs one stat per file and one list comparison per
directory (about 0.3 s of CPU per 100,000 files).

Modules: ``report`` (verdict kinds, reasons, :class:`FileReport`, :class:`ReportTable`,
:class:`ScanResult`), ``rules`` (the verdict on one file), ``formats`` (byte-level PNG/JPEG/TIFF
structure checks), ``strict`` (the Pillow settings a scan runs under), ``cache`` (the manifest and
its directory records), ``lookup`` (what the manifest knows about a list of files) and ``tree`` (the
scans of a file list or a folder, on worker threads).
"""

from __future__ import annotations

from multiscale_dali.constants import DEFAULT_MAX_PIXELS
from multiscale_dali.data.scan.report import (
    KIND_BAD,
    KIND_CONVERTED,
    KIND_IGNORED,
    KIND_OK,
    REASON_BOMB,
    REASON_CORRUPT,
    REASON_EMPTY,
    REASON_NOT_IMAGE,
    REASON_NOT_IMAGE_EXTENSION,
    REASON_UNREADABLE,
    REASON_UNSUPPORTED_FORMAT,
    REASON_UNSUPPORTED_MODE,
    BadImagesError,
    FileReport,
    ReportKind,
    ScanResult,
)
from multiscale_dali.data.scan.rules import MAX_IMAGE_SIDE, SCAN_RULES_VERSION
from multiscale_dali.data.scan.tree import (
    DEFAULT_SCAN_WORKERS,
    effective_max_pixels,
    filter_good,
    scan_files,
    scan_tree,
)

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
