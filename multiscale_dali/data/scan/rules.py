"""The verdict on one file: which formats and pixel modes both backends decode alike, and the
checks (header, structure, full decode) that decide whether a file is ok, converted or bad."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from PIL import Image

from multiscale_dali.data.scan.formats import SNIFF_BYTES, jpeg_problem, png_problem, sniff, tiff_problem
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
    FileReport,
    bad_report,
)
from multiscale_dali.data.scan.strict import collect_tag_warnings, pillow_tag_warnings

logger = logging.getLogger(__name__)

# The pixel-count cap (DEFAULT_MAX_PIXELS, Pillow's own default) is a shared constant in
# multiscale_dali.constants; callers pass it in as ``max_pixels``.
# Longest side DALI's CPU decoders accept whatever the pixel count: libpng's default user limit
# is 1,000,000 and OpenCV's (DALI's WebP/TIFF fallback) 2**20. Only a corrupt or crafted header
# claims more (seen: a WebP of 2,031,664 x 40 that Pillow decodes and DALI refuses).
MAX_IMAGE_SIDE: int = 1_000_000
# Bump when the verdict rules change, so that a manifest written by older rules is not trusted.
SCAN_RULES_VERSION: int = 1

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

_EXIF_ORIENTATION = 0x0112
_EXIF_UPRIGHT = 1
# Pillow applies the EXIF orientation itself only for TIFF; DALI applies it for every format.
_PILLOW_AUTO_ORIENTED_FORMATS: frozenset[str] = frozenset({"TIFF"})


@dataclass(frozen=True)
class Verdict:
    report: FileReport
    # I/O errors (permissions, a file vanishing mid-scan) may be transient: never cache them.
    cacheable: bool = True



@dataclass(frozen=True)
class _Decoded:
    """What a full decode learned about a usable file, for its notes."""

    width: int
    height: int
    mode: str
    raw_mode: str
    frames: int
    tag_warnings: tuple[str, ...]
    exif_orientation: int | None


def check_file(abs_path: str, *, max_pixels: int) -> Verdict:
    """The verdict on ``abs_path``, with Pillow's tag warnings for it collected on this thread.

    Runs inside :func:`~multiscale_dali.data.scan.strict.strict_pillow`."""
    with collect_tag_warnings() as tag_warnings:
        try:
            return _check_file_unguarded(abs_path, max_pixels=max_pixels)
        finally:
            for message in tag_warnings:
                logger.debug("%s: Pillow: %s", abs_path, message)


def _check_file_unguarded(abs_path: str, *, max_pixels: int) -> Verdict:
    try:
        with open(abs_path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        return Verdict(bad_report(abs_path, REASON_UNREADABLE, exc.strerror or str(exc)), cacheable=False)
    if not head:
        return Verdict(bad_report(abs_path, REASON_EMPTY, "0 bytes"))
    fmt = sniff(head)
    if fmt is None:
        return Verdict(bad_report(abs_path, REASON_NOT_IMAGE, f"unrecognised content starting with {head[:8]!r}"))
    if fmt not in _SUPPORTED_MODES:
        return Verdict(bad_report(abs_path, REASON_UNSUPPORTED_FORMAT,
                                  f"{fmt} content; supported: {', '.join(_SUPPORTED_FORMATS)}", fmt=fmt))
    try:
        return Verdict(_decode(abs_path, fmt, max_pixels=max_pixels))
    except (FileNotFoundError, PermissionError) as exc:  # vanished or locked mid-scan
        return Verdict(bad_report(abs_path, REASON_UNREADABLE, exc.strerror or str(exc), fmt=fmt), cacheable=False)
    except MemoryError:
        # Says more about this machine than about the file: report it, but do not cache it.
        return Verdict(bad_report(abs_path, REASON_UNREADABLE, "out of memory while decoding", fmt=fmt),
                       cacheable=False)
    except Exception as exc:  # noqa: BLE001
        # Pillow's plugins raise all sorts on malformed data (OSError "Truncated File Read",
        # struct.error, IndexError, ...); one odd file must not abort the scan of thousands.
        logger.debug("decoding %s failed", abs_path, exc_info=True)
        return Verdict(bad_report(abs_path, REASON_CORRUPT, _describe(exc), fmt=fmt))


def _decode(abs_path: str, fmt: str, *, max_pixels: int) -> FileReport:
    """Open lazily, check the header, then decode every pixel. Pillow errors become reports."""
    try:
        # formats=[fmt]: only the plugin matching the magic bytes may claim the file, so content
        # that merely resembles another format is not rescued by a lenient plugin.
        image = Image.open(abs_path, formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised from the header alone (the warning is an error inside strict_pillow()).
        return bad_report(abs_path, REASON_BOMB, f"{exc} (Pillow's Image.MAX_IMAGE_PIXELS)", fmt=fmt)
    except Image.UnidentifiedImageError:
        return bad_report(abs_path, REASON_CORRUPT, f"{fmt} signature but Pillow cannot parse the header", fmt=fmt)
    except (ValueError, SyntaxError, EOFError) as exc:  # plugins raise these on malformed headers
        return bad_report(abs_path, REASON_CORRUPT, f"bad {fmt} header: {exc}", fmt=fmt)
    with image:
        decoded = _check_open_image(image, abs_path, fmt, max_pixels=max_pixels)
    if isinstance(decoded, FileReport):
        return decoded
    if fmt == "PNG":
        # Pillow's load() stops after the last IDAT chunk, so it accepts a PNG cut before IEND,
        # or with a damaged IEND, that DALI (libpng) rejects.
        problem = png_problem(abs_path)
        if problem:
            return FileReport(path=abs_path, kind=KIND_BAD, reason=problem, format=fmt, width=decoded.width,
                              height=decoded.height)
    return _usable_report(abs_path, fmt, decoded)


def _header_problem(image: Image.Image, abs_path: str, fmt: str, *, max_pixels: int) -> FileReport | None:
    """A ``bad`` report for a header that claims too many pixels, too long a side or an
    unsupported pixel mode; None when the header is acceptable."""
    width, height = image.size
    # Image.open only read the header: reject oversized images before allocating pixels.
    if width * height > max_pixels:
        return bad_report(abs_path, REASON_BOMB,
                          f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                          fmt=fmt, width=width, height=height)
    if max(width, height) > MAX_IMAGE_SIDE:
        return bad_report(abs_path, REASON_BOMB,
                          f"{width}x{height} has a side longer than {MAX_IMAGE_SIDE} pixels, which DALI refuses",
                          fmt=fmt, width=width, height=height)
    if image.mode not in _SUPPORTED_MODES[fmt]:
        return bad_report(abs_path, REASON_UNSUPPORTED_MODE,
                          f"{fmt} pixel mode {image.mode!r}; the backends would not decode it to the same RGB image",
                          fmt=fmt, width=width, height=height)
    return None


def _check_open_image(image: Image.Image, abs_path: str, fmt: str, *, max_pixels: int) -> FileReport | _Decoded:
    """Header, structure, then a full decode of an opened image: a ``bad`` report, or what the
    decode learned."""
    width, height = image.size
    rejected = _header_problem(image, abs_path, fmt, max_pixels=max_pixels)
    if rejected is not None:
        return rejected
    mode = image.mode
    raw_mode = _raw_mode(image)
    problem = tiff_problem(image) if fmt == "TIFF" else jpeg_problem(abs_path) if fmt == "JPEG" else ""
    if problem:
        return FileReport(path=abs_path, kind=KIND_BAD, reason=problem, format=fmt, width=width, height=height)
    try:
        image.load()
        frames = getattr(image, "n_frames", 1)  # walks every frame header: may fail too
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - "image file is truncated", struct.error, ...
        return bad_report(abs_path, REASON_CORRUPT, f"{fmt} decode failed: {_describe(exc)}", fmt=fmt,
                          width=width, height=height)
    tag_warnings = pillow_tag_warnings()
    if fmt == "TIFF" and tag_warnings:
        # Pillow skipped or guessed malformed tags (e.g. "Tag data larger than file", also in
        # a later page's IFD); DALI's TIFF parser refuses such files.
        return bad_report(abs_path, REASON_CORRUPT, f"TIFF tags: {tag_warnings[0]}", fmt=fmt, width=width,
                          height=height)
    return _Decoded(width=width, height=height, mode=mode, raw_mode=raw_mode, frames=frames,
                    tag_warnings=tuple(tag_warnings), exif_orientation=_exif_orientation(image))


def _usable_report(abs_path: str, fmt: str, decoded: _Decoded) -> FileReport:
    """The ``ok`` or ``converted`` report of a file that decoded, with a note on everything a
    user may want to know about it."""
    mode = decoded.mode
    notes: list[str] = []
    converted = False
    if mode in _MODE_NOTES:
        notes.append(_MODE_NOTES[mode])
        converted = True
    if fmt in _SIXTEEN_BIT_FORMATS and ";16" in decoded.raw_mode and not mode.startswith("I;16"):
        notes.append(NOTE_16_BIT)
        converted = True
    extension = os.path.splitext(abs_path)[1].lower()
    if _EXTENSION_FORMATS.get(extension) != fmt:
        notes.append(f"{fmt} content named {extension or '(no extension)'}")
    if decoded.frames > 1:
        notes.append(f"{decoded.frames} frames, only the first is used")
    if decoded.exif_orientation not in (None, _EXIF_UPRIGHT) and fmt not in _PILLOW_AUTO_ORIENTED_FORMATS:
        notes.append(f"EXIF orientation {decoded.exif_orientation}: DALI applies it, Pillow only with "
                     "ImageOps.exif_transpose")
    if decoded.tag_warnings:
        # Seen: DALI ignored a damaged EXIF block while torchvision.io still read its orientation,
        # so the two backends produced the image turned by 90 degrees relative to each other.
        notes.append(f"damaged EXIF block ({decoded.tag_warnings[0]}); decoders may disagree on its orientation")
    return FileReport(
        path=abs_path,
        kind=KIND_CONVERTED if converted else KIND_OK,
        note="; ".join(notes),
        format=fmt,
        width=decoded.width,
        height=decoded.height,
    )


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


def ignored_report(abs_path: str) -> FileReport:
    """The ``ignored`` report of a file without an image extension; its content is only sniffed."""
    extension = os.path.splitext(abs_path)[1] or "(no extension)"
    note = ""
    try:
        with open(abs_path, "rb") as handle:
            fmt = sniff(handle.read(SNIFF_BYTES)) or ""
    except OSError:
        fmt = ""
    if fmt:
        # Cheap (magic bytes only) and worth saying: a real image with an odd extension is
        # silently left out of the dataset.
        note = f"{fmt} content, but dataset discovery skips this extension"
    return FileReport(path=abs_path, kind=KIND_IGNORED,
                      reason=f"{REASON_NOT_IMAGE_EXTENSION}: {extension}", note=note, format=fmt)

