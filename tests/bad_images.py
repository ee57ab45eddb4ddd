"""A small zoo of good, odd and broken image files, written into a temporary folder.

Every file is tiny (48x40) except the "bomb", whose PNG header claims 100000 x 100000 pixels
but which is a few dozen bytes on disk: only a decoder that trusts the header would allocate
its 30 GB. ``EXPECTED`` says what :mod:`multiscale_dali.data.scan` must conclude about each file.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from multiscale_dali.data import scan

WIDTH, HEIGHT = 48, 40
BOMB_SIDE = 100_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types.
PNG_RGB = 2
PNG_IEND_CHUNK_BYTES = 12  # length + "IEND" + CRC
BAD_IEND_LENGTH = 5
JPEG_DHT = 0xC4
STRAY_BYTE = 0x3F
TIFF_IFD_ENTRY_BYTES = 12
TIFF_STRIP_BYTE_COUNTS = 279
TIFF_ROWS_PER_STRIP = 278
TIFF_BOGUS_COUNT = 50
TIFF_ASCII = 2
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_90_CW = 6

CLASS_DIR = Path("train") / "cat"
EMPTY_CLASS_DIR = Path("train") / "dog"


@dataclass(frozen=True)
class Expected:
    kind: str
    reason_prefix: str = ""  # the report's reason must start with it ("" = reason must be empty)
    note_contains: str = ""  # the report's note must contain it
    fmt: str = ""  # content format, "" = not checked
    # Checked against DALI's CPU decoder: True when DALI raises on the file. Only meaningful for
    # "bad" files; never try the bomb (DALI has no pixel cap and would try to allocate it).
    dali_fails: bool = False
    # A bad file that plain Pillow (default settings, Image.open + load) decodes without error:
    # each is a case where Pillow alone would let through a file that DALI cannot use.
    pillow_loads: bool = False


EXPECTED: dict[str, Expected] = {
    "rgb.jpg": Expected("ok", fmt="JPEG"),
    "cmyk.jpg": Expected("converted", note_contains="CMYK", fmt="JPEG"),
    "gray.jpg": Expected("converted", note_contains="grayscale", fmt="JPEG"),
    "rotated.jpg": Expected("ok", note_contains="EXIF orientation 6", fmt="JPEG"),
    # Pillow warns about the damaged EXIF block; DALI ignores it: usable, with a note.
    "bad_exif.jpg": Expected("ok", note_contains="damaged EXIF block", fmt="JPEG"),
    "two_pages.tif": Expected("ok", note_contains="2 frames", fmt="TIFF"),
    "rgba.png": Expected("converted", note_contains="RGBA, alpha dropped", fmt="PNG"),
    "palette.png": Expected("converted", note_contains="palette", fmt="PNG"),
    "rgb16.png": Expected("converted", note_contains="16-bit", fmt="PNG"),
    "gray16.png": Expected("converted", note_contains="16-bit grayscale", fmt="PNG"),
    "png_named.jpg": Expected("converted", note_contains="PNG content named .jpg", fmt="PNG"),
    "truncated.jpg": Expected("bad", scan.REASON_CORRUPT, fmt="JPEG", dali_fails=True),
    "zero.jpg": Expected("bad", scan.REASON_EMPTY, dali_fails=True),
    "text.jpg": Expected("bad", scan.REASON_NOT_IMAGE, dali_fails=True),
    "bomb.png": Expected("bad", scan.REASON_BOMB, fmt="PNG"),
    # Pillow decodes each of these; DALI does not (or, for float.tif, to a different image).
    "no_iend.png": Expected("bad", scan.REASON_CORRUPT, fmt="PNG", dali_fails=True, pillow_loads=True),
    "bad_iend.png": Expected("bad", scan.REASON_CORRUPT, fmt="PNG", dali_fails=True, pillow_loads=True),
    "stray_byte.jpg": Expected("bad", scan.REASON_CORRUPT, fmt="JPEG", dali_fails=True, pillow_loads=True),
    "gif_named.png": Expected("bad", scan.REASON_UNSUPPORTED_FORMAT, fmt="GIF", dali_fails=True, pillow_loads=True),
    "bilevel.tif": Expected("bad", scan.REASON_UNSUPPORTED_MODE, fmt="TIFF", dali_fails=True, pillow_loads=True),
    "bad_tag_type.tif": Expected("bad", scan.REASON_CORRUPT, fmt="TIFF", dali_fails=True, pillow_loads=True),
    "bad_second_page.tif": Expected("bad", scan.REASON_CORRUPT, fmt="TIFF", dali_fails=True, pillow_loads=True),
    "too_wide.png": Expected("bad", scan.REASON_BOMB, fmt="PNG", dali_fails=True, pillow_loads=True),
    # DALI "decodes" a float TIFF, but to a saturated image unlike Pillow's: rejected by policy.
    "float.tif": Expected("bad", scan.REASON_UNSUPPORTED_MODE, fmt="TIFF", pillow_loads=True),
}
IGNORED_NAME = "notes.txt"  # written at the dataset root


def _pixels() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, *, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled chunk by chunk, with correct CRCs, so the header may claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_png_bytes(side: int = BOMB_SIDE) -> bytes:
    """A valid-looking header for ``side x side`` RGB pixels with one scanline of data: never
    decode it, only check that it is refused from its header."""
    return png_bytes(side, side, bit_depth=8, color_type=PNG_RGB, idat=zlib.compress(b"\x00" * 4))


def rgb16_png_bytes() -> bytes:
    """16 bits per channel RGB, which Pillow cannot write but silently reads as 8-bit RGB."""
    rows = (_pixels().astype(">u2") * 257).reshape(HEIGHT, WIDTH * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter byte 0 per scanline
    return png_bytes(WIDTH, HEIGHT, bit_depth=16, color_type=PNG_RGB, idat=zlib.compress(raw))


def jpeg_with_stray_byte(data: bytes) -> bytes:
    """Replace the 0xFF that starts the first Huffman-table segment with another byte. libjpeg
    skips such "extraneous bytes" with a warning; DALI's JPEG parser fails ("Invalid marker")."""
    offset = 2  # after SOI
    while data[offset + 1] != JPEG_DHT:
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    return data[:offset] + bytes([STRAY_BYTE]) + data[offset + 1 :]


def png_with_bad_iend(data: bytes) -> bytes:
    """Give the final IEND chunk a non-zero length: Pillow stops reading before it, libpng fails."""
    iend = len(data) - PNG_IEND_CHUNK_BYTES
    assert data[iend + 4 : iend + 8] == b"IEND"
    return data[:iend] + (BAD_IEND_LENGTH).to_bytes(4, "big") + data[iend + 4 :]


def _tiff_entry(data: bytes, tag: int, *, page: int = 0) -> int:
    """Offset of ``tag``'s 12-byte entry in IFD number ``page`` of a little-endian TIFF."""
    assert data[:4] == b"II*\x00"
    ifd = int.from_bytes(data[4:8], "little")
    for _ in range(page):
        count = int.from_bytes(data[ifd : ifd + 2], "little")
        next_at = ifd + 2 + TIFF_IFD_ENTRY_BYTES * count
        ifd = int.from_bytes(data[next_at : next_at + 4], "little")
    for index in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        entry = ifd + 2 + TIFF_IFD_ENTRY_BYTES * index
        if int.from_bytes(data[entry : entry + 2], "little") == tag:
            return entry
    raise ValueError(f"tag {tag} not in IFD {page}")


def tiff_with_tag_type(data: bytes, tag: int, new_type: int) -> bytes:
    """Change the field type of ``tag`` in the first IFD (libtiff refuses; Pillow copes)."""
    entry = _tiff_entry(data, tag)
    return data[: entry + 2] + new_type.to_bytes(2, "little") + data[entry + 4 :]


def tiff_with_tag_outside_file(data: bytes, tag: int, *, page: int) -> bytes:
    """Make ``tag`` in IFD ``page`` claim several values stored past the end of the file: Pillow
    warns and skips the tag, DALI's TIFF parser fails."""
    entry = _tiff_entry(data, tag, page=page)
    count = TIFF_BOGUS_COUNT.to_bytes(4, "little")
    offset = (len(data) * 2).to_bytes(4, "little")
    return data[: entry + 4] + count + offset + data[entry + 12 :]


def wide_png_bytes(width: int) -> bytes:
    """A valid, black ``width x 1`` RGB PNG (a few kB however wide)."""
    return png_bytes(width, 1, bit_depth=8, color_type=PNG_RGB, idat=zlib.compress(bytes(1 + 3 * width)))


def write_zoo(root: Path) -> Path:
    """Write ``root/train/cat/<EXPECTED names>``, an empty ``root/train/dog``, a hidden file and
    ``root/notes.txt``; return the class folder."""
    folder = root / CLASS_DIR
    folder.mkdir(parents=True)
    (root / EMPTY_CLASS_DIR).mkdir(parents=True)
    rgb = Image.fromarray(_pixels())

    rgb.save(folder / "rgb.jpg", quality=90)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.jpg")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_90_CW
    rgb.save(folder / "rotated.jpg", exif=exif.tobytes())
    exif_bytes = exif.tobytes()
    rgb.save(folder / "bad_exif.jpg", exif=exif_bytes[: len(exif_bytes) // 2])  # cut mid-IFD

    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    (folder / "rgb16.png").write_bytes(rgb16_png_bytes())
    Image.fromarray(_pixels()[..., 0].astype(np.uint16) * 200).save(folder / "gray16.png")  # mode I;16
    (folder / "png_named.jpg").write_bytes((folder / "rgba.png").read_bytes())

    whole_jpeg = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole_jpeg[: len(whole_jpeg) // 2])
    whole_png = (folder / "palette.png").read_bytes()
    (folder / "no_iend.png").write_bytes(whole_png[:-PNG_IEND_CHUNK_BYTES])
    (folder / "bad_iend.png").write_bytes(png_with_bad_iend(whole_png))
    (folder / "stray_byte.jpg").write_bytes(jpeg_with_stray_byte(whole_jpeg))
    rgb.save(folder / "plain.tif")
    plain_tiff = (folder / "plain.tif").read_bytes()
    (folder / "plain.tif").unlink()
    (folder / "bad_tag_type.tif").write_bytes(tiff_with_tag_type(plain_tiff, TIFF_STRIP_BYTE_COUNTS, TIFF_ASCII))
    rgb.save(folder / "two_pages.tif", save_all=True, append_images=[rgb.rotate(90)])
    two_pages = (folder / "two_pages.tif").read_bytes()
    (folder / "bad_second_page.tif").write_bytes(tiff_with_tag_outside_file(two_pages, TIFF_ROWS_PER_STRIP, page=1))
    (folder / "too_wide.png").write_bytes(wide_png_bytes(scan.MAX_IMAGE_SIDE + 1))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    rgb.save(folder / "gif_named.png", format="GIF")
    rgb.convert("1").save(folder / "bilevel.tif")  # Pillow omits BitsPerSample for 1-bit
    rgb.convert("F").save(folder / "float.tif")
    (folder / "bomb.png").write_bytes(bomb_png_bytes())

    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: never reported
    (root / IGNORED_NAME).write_text("collected from the web, 2024\n")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(EXPECTED)
    return folder


def zoo_paths(folder: Path) -> dict[str, str]:
    return {name: os.path.join(folder, name) for name in EXPECTED}
