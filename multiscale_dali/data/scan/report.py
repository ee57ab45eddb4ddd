"""What a scan concludes: the verdict kinds, the reason categories, one file's report and a whole scan's result."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

from multiscale_dali.errors import EXIT_FAILURE, UserError

# Bad files are logged one by one up to this many; the rest are counted (a broken dataset can
# have thousands and the log must stay readable).
MAX_LOGGED_PROBLEMS: int = 20

ReportKind = Literal["ok", "converted", "bad", "ignored"]
KIND_OK: ReportKind = "ok"
KIND_CONVERTED: ReportKind = "converted"
KIND_BAD: ReportKind = "bad"
KIND_IGNORED: ReportKind = "ignored"
_KINDS: frozenset[str] = frozenset((KIND_OK, KIND_CONVERTED, KIND_BAD, KIND_IGNORED))

# ``reason`` always starts with one of these, followed by ": <details>", so callers and tests can
# branch on the category while people read the details.
REASON_EMPTY = "empty file"
REASON_UNREADABLE = "unreadable"
REASON_NOT_IMAGE = "not an image"
REASON_UNSUPPORTED_FORMAT = "unsupported format"
REASON_UNSUPPORTED_MODE = "unsupported pixel format"
REASON_BOMB = "decompression bomb"
REASON_CORRUPT = "truncated or corrupt"
REASON_NOT_IMAGE_EXTENSION = "not an image extension"


class BadImagesError(UserError, ValueError, exit_code=EXIT_FAILURE, hint="Or train without them: --on-bad-file skip."):
    """Raised by :meth:`ScanResult.raise_for_bad`; the message names the bad files and reasons."""


@dataclass(frozen=True)
class FileReport:
    """The verdict on one file. ``path`` is absolute; ``format`` is the content's format (Pillow's
    name, e.g. ``"PNG"``), whatever the extension says; ``width``/``height`` are the stored
    dimensions (0 when unknown)."""

    path: str
    kind: ReportKind
    reason: str = ""  # "" unless kind is "bad" or "ignored"
    note: str = ""  # "; "-joined remarks on a usable file, e.g. "CMYK, converted to RGB"
    format: str = ""
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"{self.path}: unknown report kind {self.kind!r}; expected one of {sorted(_KINDS)}")

    @property
    def ok(self) -> bool:
        """True when the file may be handed to a loader (kind ``ok`` or ``converted``)."""
        return self.kind in (KIND_OK, KIND_CONVERTED)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileReport:
        return cls(
            path=str(data["path"]),
            kind=data["kind"],
            reason=str(data.get("reason", "")),
            note=str(data.get("note", "")),
            format=str(data.get("format", "")),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
        )


@dataclass(frozen=True)
class ScanResult:
    """All reports of one scan, in input order (:func:`scan_files`) or path order (:func:`scan_tree`).

    ``empty_dirs`` lists folders holding no image file and no subfolder (from :func:`scan_tree`);
    ``cached_count`` is how many verdicts came from the manifest without opening the file.
    """

    reports: tuple[FileReport, ...]
    empty_dirs: tuple[str, ...] = ()
    cached_count: int = 0

    @property
    def bad(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_BAD)

    @property
    def converted(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_CONVERTED)

    @property
    def ignored(self) -> tuple[FileReport, ...]:
        return tuple(r for r in self.reports if r.kind == KIND_IGNORED)

    @property
    def good_paths(self) -> frozenset[str]:
        """Absolute paths of the files a loader may read (kind ``ok`` or ``converted``)."""
        return frozenset(r.path for r in self.reports if r.ok)

    @property
    def ok(self) -> bool:
        """No bad file. Ignored files and empty folders are not errors at this level: whether an
        empty class folder is fatal is the dataset layout's decision."""
        return not self.bad

    def counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in (KIND_OK, KIND_CONVERTED, KIND_BAD, KIND_IGNORED)}
        for report in self.reports:
            counts[report.kind] += 1
        return counts

    def describe_bad(self, *, limit: int = MAX_LOGGED_PROBLEMS) -> str:
        """One line per bad file (``path: reason``), at most ``limit`` of them, then a count."""
        bad = self.bad
        lines = [f"{r.path}: {r.reason}" for r in bad[:limit]]
        if len(bad) > limit:
            lines.append(f"... and {len(bad) - limit} more bad file(s)")
        return "\n".join(lines)

    def raise_for_bad(self) -> None:
        """Raise :class:`BadImagesError` naming every bad file (up to a limit) if there is one."""
        if self.bad:
            raise BadImagesError(
                f"{len(self.bad)} file(s) cannot be decoded by every backend; fix or remove them "
                f"(or filter them out with filter_good):\n{self.describe_bad()}"
            )

    def to_json(self, *, indent: int | None = 2) -> str:
        payload = {
            "reports": [r.to_dict() for r in self.reports],
            "empty_dirs": list(self.empty_dirs),
            "cached_count": self.cached_count,
            "counts": self.counts(),
        }
        return json.dumps(payload, indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScanResult:
        payload = json.loads(text)
        return cls(
            reports=tuple(FileReport.from_dict(r) for r in payload["reports"]),
            empty_dirs=tuple(payload.get("empty_dirs", ())),
            cached_count=int(payload.get("cached_count", 0)),
        )


def bad_report(abs_path: str, category: str, detail: str, *, fmt: str = "", width: int = 0,
               height: int = 0) -> FileReport:
    """A ``bad`` report whose reason is ``"<category>: <detail>"``."""
    return FileReport(path=abs_path, kind=KIND_BAD, reason=f"{category}: {detail}", format=fmt, width=width,
                      height=height)
