"""What the scan cache already knows about a list of files, directory by directory.

The files are grouped by directory; each directory's files are stat-ed once (relative to an open
directory descriptor: the kernel resolves the directory once, not per file) and their (size,
mtime_ns) compared with the directory's record as one list. That list comparison is the whole cost
of an unchanged directory. Otherwise each file is matched by name: a file whose size or mtime
changed, or that the record lacks, is left for decoding; the directory's record is then rebuilt
from what still holds, the new verdicts, and the record's files that this scan did not ask about
but that still exist (another split's files, say); files that no longer exist are dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain, compress
from operator import attrgetter
from typing import Iterable, Sequence

from multiscale_dali.data.scan.cache import KEY_FIELDS, DirRecord, Manifest
from multiscale_dali.data.scan.report import REASON_UNREADABLE, FileReport, Finding, ReportTable, bad_report

# Paths that are already absolute and normal need no os.path.abspath (a few microseconds each, a
# measurable share of a cached check of a million files). Only on POSIX, where "/" is the one separator.
_POSIX_PATHS: bool = os.sep == "/" and os.altsep is None
_STAT_DIR_FD: bool = os.stat in os.supports_dir_fd
# Stat key of a file that could not be stat-ed: never equal to a real one.
_NO_KEY: tuple[int, int] = (-1, -1)
_SIZE_MTIME = attrgetter("st_size", "st_mtime_ns")
_Entry = tuple[int, int, Finding]  # size, mtime_ns, finding


@dataclass(frozen=True)
class Pending:
    """A file left for decoding: where its verdict goes in the result and in its directory's record."""

    position: int
    path: str
    directory: str
    name: str
    size: int
    mtime_ns: int


def unique_abs_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Absolute, normalised paths in input order, each once."""
    given = paths if isinstance(paths, list) else list(paths)
    if set(map(type, given)) != {str}:  # path-like objects among them
        given = [os.fspath(p) for p in given]
    if not _already_normal(given):
        given = [os.path.abspath(p) for p in given]
    return list(dict.fromkeys(given))


def _already_normal(paths: list[str]) -> bool:
    """True when every path (a ``str``) is absolute and normal already (what discovery hands
    over), checked on all of them at once: joined with NUL, which no POSIX path can contain, each
    must start with "/", and none may hold "//", "/." (so no "/./" or "/../") or end with "/"."""
    if not _POSIX_PATHS or not paths:
        return False
    joined = "\0".join(paths)
    separators = len(paths) - 1
    return (joined.startswith("/") and joined.count("\0") == separators == joined.count("\0/") and "//" not in joined
            and "/." not in joined and "/\0" not in joined and not joined.endswith("/"))


def _by_directory(abs_paths: Sequence[str]) -> dict[str, tuple[list[str], list[int]]]:
    """``{directory: (sorted names, their positions in abs_paths)}``.

    Discovery lists a directory's files together, so the paths come in runs of one directory: the
    runs are found with C-level comparisons and each is appended whole."""
    if not abs_paths:
        return {}
    parts = [path.rpartition(os.sep) for path in abs_paths]
    directories = [part[0] or os.sep for part in parts]
    names = [part[2] for part in parts]
    n = len(names)
    starts = [0, *compress(range(1, n), map(str.__ne__, directories[1:], directories[:-1])), n]
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for start, stop in zip(starts, starts[1:]):
        group = groups.setdefault(directories[start], ([], []))
        group[0].extend(names[start:stop])
        group[1].extend(range(start, stop))
    for directory, (group_names, positions) in groups.items():
        order = sorted(range(len(group_names)), key=group_names.__getitem__)
        if order != list(range(len(order))):
            groups[directory] = ([group_names[i] for i in order], [positions[i] for i in order])
    return groups


def stat_keys(directory: str, names: Sequence[str]) -> tuple[list[int], dict[int, OSError]]:
    """``(flat [size, mtime_ns, ...] of each name, {position: error} for names that cannot be stat-ed)``."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if _STAT_DIR_FD else None
    except OSError as exc:
        return list(_NO_KEY) * len(names), dict.fromkeys(range(len(names)), exc)
    try:
        if fd is not None:
            try:  # the common case, without a Python-level try per file
                stats = [os.stat(name, dir_fd=fd) for name in names]
                return list(chain.from_iterable(map(_SIZE_MTIME, stats))), {}
            except OSError:
                pass
        return _stat_one_by_one(directory, names, fd)
    finally:
        if fd is not None:
            os.close(fd)


def _stat_one_by_one(directory: str, names: Sequence[str], fd: int | None) -> tuple[list[int], dict[int, OSError]]:
    keys: list[int] = []
    failed: dict[int, OSError] = {}
    for i, name in enumerate(names):
        try:
            st = os.stat(name, dir_fd=fd) if fd is not None else os.stat(os.path.join(directory, name))
        except OSError as exc:
            failed[i] = exc
            keys += _NO_KEY
            continue
        keys += _SIZE_MTIME(st)
    return keys, failed


class CacheLookup:
    """Cached verdicts of ``abs_paths`` under pixel limit ``limit``, the files still to decode
    (:attr:`pending`), and the records to write back once they are decoded (:meth:`store`)."""

    def __init__(self, abs_paths: Sequence[str], manifest: Manifest, *, limit: int) -> None:
        self.paths = abs_paths
        self.limit = limit
        self.cached_count = 0
        self.pending: list[Pending] = []
        self._index = [-1] * len(abs_paths)
        self._ids: dict[Finding, int] = {}
        self._manifest = manifest
        self._rebuilt: dict[str, dict[str, _Entry]] = {}  # directory -> entries of its new record
        for directory, (names, positions) in _by_directory(abs_paths).items():
            self._look_up(directory, names, positions)

    def _id(self, finding: Finding) -> int:
        return self._ids.setdefault(finding, len(self._ids))

    def _look_up(self, directory: str, names: list[str], positions: list[int]) -> None:
        keys, failed = stat_keys(directory, names)
        record = self._manifest.record(directory)
        if record is not None and record.limit != self.limit:
            record = None  # judged under another pixel limit: every verdict may differ
        if record is not None and not failed and record.names == names and record.keys == keys:
            ids = [self._id(finding) for finding in record.findings]
            index = self._index
            for position, k in zip(positions, map(ids.__getitem__, record.index)):
                index[position] = k
            self.cached_count += len(names)
            return
        known = record.entries() if record is not None else {}
        entries = self._surviving(directory, known, names)
        for i, (name, position) in enumerate(zip(names, positions)):
            if i in failed:
                exc = failed[i]
                self._index[position] = self._id(bad_report(self.paths[position], REASON_UNREADABLE,
                                                            exc.strerror or str(exc)).finding)
                continue
            size, mtime_ns = keys[KEY_FIELDS * i], keys[KEY_FIELDS * i + 1]
            entry = known.get(name)
            if entry is not None and entry[:2] == (size, mtime_ns):
                self._index[position] = self._id(entry[2])
                entries[name] = entry
                self.cached_count += 1
            else:
                self.pending.append(Pending(position, self.paths[position], directory, name, size, mtime_ns))
        self._rebuilt[directory] = entries

    @staticmethod
    def _surviving(directory: str, known: dict[str, _Entry], names: list[str]) -> dict[str, _Entry]:
        """The entries of files this scan did not ask about that still exist in ``directory``."""
        asked = set(names)
        others = {name: entry for name, entry in known.items() if name not in asked}
        if not others:
            return {}
        try:
            present = set(os.listdir(directory))
        except OSError:
            return {}
        return {name: entry for name, entry in others.items() if name in present}

    def settle(self, pending: Pending, report: FileReport, *, cacheable: bool) -> None:
        """Record the verdict on a pending file (in the record too when ``cacheable``)."""
        finding = report.finding
        self._index[pending.position] = self._id(finding)
        if cacheable:
            self._rebuilt[pending.directory][pending.name] = (pending.size, pending.mtime_ns, finding)

    def store(self) -> None:
        """Put the rebuilt records of the directories that changed into the manifest."""
        for directory, entries in self._rebuilt.items():
            record = DirRecord.from_entries(self.limit, entries)
            if record != self._manifest.record(directory):
                self._manifest.put(directory, record)

    def table(self) -> ReportTable:
        """Every file's report, in input order (every pending file must be settled first)."""
        if self.pending and min(self._index) < 0:
            raise RuntimeError("a pending file has no verdict yet")
        return ReportTable(self.paths, self._index, list(self._ids))
