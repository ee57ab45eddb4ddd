"""The scan cache: a JSON manifest of verdicts keyed by (absolute path, size, mtime_ns, pixel limit),
so that a second scan re-decodes only the files that changed."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL

from multiscale_dali.data.scan.report import FileReport
from multiscale_dali.data.scan.rules import SCAN_RULES_VERSION
from multiscale_dali.fileio import atomic_write_text

logger = logging.getLogger(__name__)

# The value predates the subpackage; changing it would make every existing manifest untrusted.
_MANIFEST_FORMAT: str = "multiscale_dali.data.scan/manifest"


@dataclass
class Manifest:
    """The on-disk cache: absolute path -> stat key and report."""

    path: Path | None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        # A verdict is only as good as the rules and the decoder that produced it.
        if payload.get("rules_version") != SCAN_RULES_VERSION or payload.get("pillow") != PIL.__version__:
            logger.info("scan cache %s was written by other rules or Pillow version; rescanning", path)
            return cls(path)
        entries = payload.get("entries")
        return cls(path, dict(entries) if isinstance(entries, dict) else {})

    def lookup(self, abs_path: str, key: tuple[int, int, int]) -> FileReport | None:
        entry = self.entries.get(abs_path)
        if entry is None or tuple(entry.get("key", ())) != key:
            return None
        try:
            return FileReport.from_dict(entry["report"])
        except (KeyError, TypeError, ValueError):
            return None

    def store(self, abs_path: str, key: tuple[int, int, int], report: FileReport) -> None:
        self.entries[abs_path] = {"key": list(key), "report": report.to_dict()}

    def save(self) -> None:
        if self.path is None:
            return
        # Entries of files scanned by an earlier call (e.g. another split) are kept so that one
        # manifest can serve several scans, but files that no longer exist are dropped so the
        # manifest does not grow forever.
        entries = {p: e for p, e in sorted(self.entries.items()) if os.path.exists(p)}
        payload = {
            "format": _MANIFEST_FORMAT,
            "rules_version": SCAN_RULES_VERSION,
            "pillow": PIL.__version__,
            "entries": entries,
        }
        try:
            atomic_write_text(self.path, json.dumps(payload, indent=1, sort_keys=True))
        except OSError as exc:
            # The cache is an optimisation: failing to write it must not fail the scan.
            logger.warning("could not write scan cache %s: %s", self.path, exc)
