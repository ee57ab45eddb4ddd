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


def walk_dataset(
    top: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``top`` over non-hidden entries in sorted order: what discovery and the scan read.

    Directory symlinks are followed, since datasets are often assembled from links (as torchvision's
    ImageFolder does), except those that would show a file twice: a link into the dataset ``root``
    (default ``top``) or to a folder holding it (a loop, which os.walk would follow 40 levels deep,
    copying images across classes and splits), and a folder already walked (a loop outside the root).
    Each link left out is logged.
    """
    root_real = os.path.realpath(root if root is not None else top)
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and overlaps_root(os.path.realpath(path), root_real):
                logger.warning("not following %s: it links to %s, inside (or above) %s, whose files are read "
                               "once already", path, os.path.realpath(path), root_real)
                continue
            kept.append(name)
        dirnames[:] = kept
        yield dirpath, dirnames, sorted(f for f in filenames if not f.startswith("."))
