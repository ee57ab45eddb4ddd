"""The one walk of a dataset folder that discovery and the pre-flight scan share, so both see the
same files: sorted, hidden entries left out, folder symlinks followed unless they would show a file
twice."""

from __future__ import annotations

import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)


def overlaps_root(target: str, root_real: str) -> bool:
    """Whether ``target`` lies inside the dataset root or holds it (``/``, a parent of the root)."""
    return os.path.commonpath([target, root_real]) in (target, root_real)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _followed(entry: os.DirEntry[str], root_real: str) -> bool:
    """A subfolder to walk: any real folder, and a linked one unless it would show files twice."""
    if not entry.is_symlink():
        return True
    target = os.path.realpath(entry.path)
    if overlaps_root(target, root_real):
        logger.warning("not following %s: it links to %s, inside (or above) %s, whose files are read once "
                       "already", entry.path, target, root_real)
        return False
    return True


def walk_dataset(
    top: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> Iterator[tuple[str, list[str], list[str]]]:
    """``(folder, sorted subfolder names, sorted regular file names)`` of every non-hidden folder below
    ``top``, top-down, in sorted order: what discovery and the scan read.

    Directory symlinks are followed, since datasets are often assembled from links (as torchvision's
    ImageFolder does), except those that would show a file twice: a link into the dataset ``root``
    (default ``top``) or to a folder holding it (a loop, which ``os.walk`` would follow 40 levels deep,
    copying images across classes and splits), and a folder already walked (a loop outside the root).
    Each link left out is logged. Sockets, FIFOs and dangling links are not files here; a folder that
    cannot be listed is skipped, as ``os.walk`` does.

    Built on ``os.scandir``: ``DirEntry.is_dir``/``is_file`` use the type readdir reports, so an
    unchanged tree of a million files costs one ``readdir`` per folder and a stat per symlink only.
    """
    root_real = os.path.realpath(root if root is not None else top)
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(top)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = [entry for entry in it if not entry.name.startswith(".")]
        except OSError:
            continue
        subdirs = sorted(e.name for e in entries if _is_dir(e) and _followed(e, root_real))
        files = sorted(e.name for e in entries if _is_file(e))
        yield folder, subdirs, files
        stack += [folder + os.sep + name for name in reversed(subdirs)]
