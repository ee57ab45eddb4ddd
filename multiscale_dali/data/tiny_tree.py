"""A folder of very many tiny JPEGs, made fast, to measure what listing and vetting cost at scale.

Discovery and the pre-flight scan cache do work per file and per folder, whatever the images hold,
so a million-file tree of 16x16 JPEGs measures them as well as ImageNet would, in minutes and a few
hundred megabytes. One JPEG per class is encoded once (a flat colour of its own, so classes differ)
and every other file of the class is a hard link to it: a link costs a directory entry, not an
inode or a data block. Where a link cannot be made (another filesystem, a filesystem without hard
links, or the per-inode link limit, 65,000 on ext4) the file is copied instead.

Layout: an ImageFolder without splits, ``dest/class_<k>/img_<i>.jpg`` with zero-padded indices, so
sorted order is numeric order.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["TinyTree", "DEFAULT_TINY_SIDE", "class_file_counts", "write_tiny_jpeg_tree"]

DEFAULT_TINY_SIDE: int = 16
# JPEG's smallest complete block is 8x8; below that every scanner and decoder sees padding only.
MIN_TINY_SIDE: int = 8
# Errors that mean "no hard link here, copy instead": too many links to one inode, another
# filesystem, or a filesystem (or policy) that refuses links.
_LINK_FALLBACK_ERRNOS: frozenset[int] = frozenset({errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ENOTSUP})


@dataclass(frozen=True)
class TinyTree:
    """What :func:`write_tiny_jpeg_tree` wrote: the root, the file and class counts, and how many
    files are hard links (the rest are real files: one per class plus any copies)."""

    root: str
    files: int
    classes: int
    linked: int


def class_file_counts(files: int, classes: int) -> tuple[int, ...]:
    """Files per class: as even as possible, the first ``files % classes`` classes one more."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    if files < classes:
        raise ValueError(f"need at least one file per class: {files} files for {classes} classes")
    base, extra = divmod(files, classes)
    return tuple(base + (1 if k < extra else 0) for k in range(classes))


def write_tiny_jpeg_tree(
    dest: str | os.PathLike[str], *, files: int, classes: int, side: int = DEFAULT_TINY_SIDE, link: bool = True
) -> TinyTree:
    """Write ``files`` JPEGs of ``side`` x ``side`` pixels in ``classes`` class folders under ``dest``.

    ``dest`` must not exist or be an empty folder (nothing already there is overwritten). With
    ``link`` (the default) the files of a class are hard links to its first file where the
    filesystem allows; with ``link=False`` every file is a copy.
    """
    if side < MIN_TINY_SIDE:
        raise ValueError(f"side must be >= {MIN_TINY_SIDE} pixels, got {side}")
    counts = class_file_counts(files, classes)
    root = Path(os.path.abspath(os.fspath(dest)))
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not an empty folder; choose a new destination")
    root.mkdir(parents=True, exist_ok=True)
    class_digits = len(str(classes - 1))
    file_digits = len(str(max(counts) - 1))
    linked = 0
    for k, count in enumerate(counts):
        folder = os.path.join(root, f"class_{k:0{class_digits}d}")
        os.mkdir(folder)
        names = [os.path.join(folder, f"img_{i:0{file_digits}d}.jpg") for i in range(count)]
        with open(names[0], "wb") as out:
            out.write(_tiny_jpeg(k, classes=classes, side=side))
        linked += _replicate(names[0], names[1:], link=link)
    return TinyTree(root=str(root), files=files, classes=classes, linked=linked)


def _replicate(source: str, targets: list[str], *, link: bool) -> int:
    """Make every target a hard link to ``source`` (a copy where linking fails); the links made."""
    linked = 0
    for target in targets:
        if link:
            try:
                os.link(source, target)
                linked += 1
                continue
            except OSError as exc:
                if exc.errno not in _LINK_FALLBACK_ERRNOS:
                    raise
                link = False  # the same error would follow for every remaining file of the class
        shutil.copyfile(source, target)
    return linked


def _tiny_jpeg(k: int, *, classes: int, side: int) -> bytes:
    """A flat-colour JPEG whose hue is the class's place on the colour wheel."""
    hue = int(255 * k / max(classes, 1))
    image = Image.new("HSV", (side, side), (hue, 200, 200)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
