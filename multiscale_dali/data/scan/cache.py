"""The scan cache: one JSON manifest per dataset holding, for each directory, the verdicts of its files
keyed by (name, size, mtime_ns) and the pixel limit, so that a second scan re-decodes only the files
that changed.

One record per directory, not one entry per file, because the cached check runs at every training
start: a record holds the directory's sorted file names, their sizes and mtimes as one flat list of
integers, and each file's verdict as an index into the few distinct findings of the directory. An
unchanged directory is then confirmed by stat-ing its files and comparing two lists, and loading
the manifest parses names and integers, not a dictionary per file. A changed, added or removed file
rewrites only its directory's record; only the changed or added files are decoded again.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import PIL

from multiscale_dali.data.scan.report import Finding
from multiscale_dali.data.scan.rules import SCAN_RULES_VERSION
from multiscale_dali.fileio import atomic_write_text

logger = logging.getLogger(__name__)

# The value predates the subpackage; changing it would make every existing manifest untrusted.
_MANIFEST_FORMAT: str = "multiscale_dali.data.scan/manifest"
# 1 (no "version" field): one entry per absolute path; 2: one record per directory. A manifest of
# another version is ignored whole (rescanned once, then rewritten in this version).
MANIFEST_VERSION: int = 2
# Keys of a file in a record's flat ``keys`` list: size then mtime_ns.
KEY_FIELDS: int = 2


@dataclass(frozen=True)
class DirRecord:
    """The cached verdicts of the files of one directory, all judged under pixel limit ``limit``.

    ``names`` are sorted; file ``i`` has size ``keys[2 * i]``, mtime ``keys[2 * i + 1]`` and the
    finding ``findings[index[i]]``.
    """

    limit: int
    names: list[str]
    keys: list[int]
    index: list[int]
    findings: list[Finding]

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.keys) != KEY_FIELDS * n or len(self.index) != n:
            raise ValueError(f"{n} names, {len(self.keys)} keys and {len(self.index)} indices do not match")
        if self.index and not 0 <= min(self.index) <= max(self.index) < len(self.findings):
            raise ValueError("finding index out of range")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DirRecord:
        findings = [tuple(f) for f in data["findings"]]
        if not all(len(f) == 6 for f in findings):
            raise ValueError("a finding has the wrong number of fields")
        return cls(limit=int(data["limit"]), names=list(data["names"]), keys=list(data["keys"]),
                   index=list(data["index"]), findings=findings)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "names": self.names, "keys": self.keys, "index": self.index,
                "findings": [list(f) for f in self.findings]}

    def entries(self) -> dict[str, tuple[int, int, Finding]]:
        """``{name: (size, mtime_ns, finding)}``, for merging a record with new verdicts."""
        keys, findings = self.keys, self.findings
        return {name: (keys[2 * i], keys[2 * i + 1], findings[self.index[i]]) for i, name in enumerate(self.names)}

    @classmethod
    def from_entries(cls, limit: int, entries: Mapping[str, tuple[int, int, Finding]]) -> DirRecord:
        names = sorted(entries)
        ids: dict[Finding, int] = {}
        keys: list[int] = []
        index: list[int] = []
        for name in names:
            size, mtime_ns, finding = entries[name]
            keys += (size, mtime_ns)
            index.append(ids.setdefault(finding, len(ids)))
        return cls(limit=limit, names=names, keys=keys, index=index, findings=list(ids))


@dataclass
class Manifest:
    """The on-disk cache: absolute directory path -> :class:`DirRecord` (parsed when first asked for)."""

    path: Path | None
    raw: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    _parsed: dict[str, DirRecord | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> Manifest:
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
        if payload.get("version") != MANIFEST_VERSION:
            logger.info("scan cache %s has format version %s, this msdali writes %d; rescanning once",
                        path, payload.get("version", 1), MANIFEST_VERSION)
            return cls(path)
        # A verdict is only as good as the rules and the decoder that produced it.
        if payload.get("rules_version") != SCAN_RULES_VERSION or payload.get("pillow") != PIL.__version__:
            logger.info("scan cache %s was written by other rules or Pillow version; rescanning", path)
            return cls(path)
        dirs = payload.get("dirs")
        return cls(path, dict(dirs) if isinstance(dirs, dict) else {})

    def record(self, directory: str) -> DirRecord | None:
        """The record of ``directory``, or None when there is none or it is malformed."""
        if directory not in self._parsed:
            data = self.raw.get(directory)
            try:
                self._parsed[directory] = DirRecord.from_json(data) if isinstance(data, dict) else None
            except (KeyError, TypeError, ValueError):
                logger.info("ignoring a malformed scan cache record for %s", directory)
                self._parsed[directory] = None
        return self._parsed[directory]

    def put(self, directory: str, record: DirRecord) -> None:
        self._parsed[directory] = record
        self.raw[directory] = record.to_json()
        self.changed = True

    def save(self) -> None:
        """Rewrite the manifest atomically if a record changed; records of directories that no
        longer exist are dropped so the manifest does not grow forever."""
        if self.path is None or not self.changed:
            return
        dirs = {d: r for d, r in self.raw.items() if os.path.isdir(d)}
        payload = {
            "format": _MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "rules_version": SCAN_RULES_VERSION,
            "pillow": PIL.__version__,
            "dirs": dirs,
        }
        try:
            # Compact, one line: a million-file manifest is parsed at every run start.
            atomic_write_text(self.path, json.dumps(payload, sort_keys=True, separators=(",", ":")))
        except OSError as exc:
            # The cache is an optimisation: failing to write it must not fail the scan.
            logger.warning("could not write scan cache %s: %s", self.path, exc)
