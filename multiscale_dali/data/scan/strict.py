"""The Pillow settings a scan runs under (bombs are errors, truncation fails, TIFFs go through
libtiff) and the per-thread collection of Pillow's TIFF-tag warnings."""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Iterator

from PIL import Image, ImageFile, TiffImagePlugin, features

# Pillow wheels ship libtiff; a build without it falls back to Pillow's own, more lenient reader.
_HAVE_LIBTIFF: bool = bool(features.check_codec("libtiff"))

# Per worker thread: the TIFF-tag warnings Pillow raised for the file being checked.
_thread_state = threading.local()
_TIFF_PLUGIN_FILE = "TiffImagePlugin.py"


def pillow_tag_warnings() -> list[str]:
    """The TIFF-tag warnings collected so far for this thread's file (none outside
    :func:`collect_tag_warnings`)."""
    return list(getattr(_thread_state, "tag_warnings", None) or ())


@contextlib.contextmanager
def collect_tag_warnings() -> Iterator[list[str]]:
    """Within the block, Pillow's TIFF-tag warnings raised on this thread (inside
    :func:`strict_pillow`) are appended to the yielded list instead of being shown."""
    sink: list[str] = []
    _thread_state.tag_warnings = sink
    try:
        yield sink
    finally:
        _thread_state.tag_warnings = None


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
def strict_pillow() -> Iterator[None]:
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

