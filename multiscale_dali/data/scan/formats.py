"""Byte-level structure of the accepted formats: what the magic bytes say, and the PNG chunks, JPEG
header segments and TIFF tags that Pillow tolerates but DALI's decoders refuse."""

from __future__ import annotations

import os
import zlib

from PIL import Image

from multiscale_dali.data.scan.report import REASON_CORRUPT, REASON_UNSUPPORTED_MODE

# Enough leading bytes for every signature below (WebP needs 12: "RIFF" <size> "WEBP").
SNIFF_BYTES: int = 16
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


def sniff(head: bytes) -> str | None:
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


def tiff_problem(image: Image.Image) -> str:
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


def png_problem(abs_path: str) -> str:
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


def jpeg_problem(abs_path: str) -> str:
    """Walk the JPEG header segments up to the image data; a reason to reject, or "".

    libjpeg (Pillow) skips stray bytes between segments with a warning on stderr that Python never
    sees, while DALI's JPEG parser rejects the file ("Invalid marker"): check the layout ourselves.
    Reads only the header, never the entropy-coded data.
    """
    with open(abs_path, "rb") as handle:
        offset = handle.seek(len(b"\xff\xd8"))  # after SOI, which sniff() has already seen
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

