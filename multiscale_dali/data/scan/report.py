"""What a scan concludes: the verdict kinds, the reason categories, one file's report and a whole scan's result."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence, overload

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
_USABLE_KINDS: frozenset[str] = frozenset((KIND_OK, KIND_CONVERTED))

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
        return self.kind in _USABLE_KINDS

    @property
    def finding(self) -> Finding:
        """The verdict without the path, which many files share (see :class:`ReportTable`)."""
        return (self.kind, self.reason, self.note, self.format, self.width, self.height)

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


# A report without its path: (kind, reason, note, format, width, height), FileReport's field order.
Finding = tuple[str, str, str, str, int, int]


class ReportTable(Sequence[FileReport]):
    """The reports of many files as two parallel lists, each file's absolute path and an index into
    the distinct findings the files share, plus those findings.

    A cached check of a million files then costs two lists instead of a million objects; a
    :class:`FileReport` is made only for a file someone looks at. Counting, picking the bad files
    and the set of good paths work on the indices. Compares equal to any sequence of the same reports.
    """

    __slots__ = ("paths", "index", "findings")

    def __init__(self, paths: Sequence[str], index: Sequence[int], findings: Sequence[Finding]) -> None:
        if len(paths) != len(index):
            raise ValueError(f"{len(paths)} paths but {len(index)} finding indices")
        if index and not 0 <= min(index) <= max(index) < len(findings):
            raise ValueError(f"finding index outside 0..{len(findings) - 1}")
        self.paths: tuple[str, ...] = tuple(paths)
        self.index: tuple[int, ...] = tuple(index)
        self.findings: tuple[Finding, ...] = tuple(findings)

    @classmethod
    def from_reports(cls, reports: Iterable[FileReport]) -> ReportTable:
        ids: dict[Finding, int] = {}
        paths: list[str] = []
        index: list[int] = []
        for report in reports:
            paths.append(report.path)
            index.append(ids.setdefault(report.finding, len(ids)))
        return cls(paths, index, list(ids))

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, i: int) -> FileReport: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[FileReport, ...]: ...

    def __getitem__(self, i: int | slice) -> FileReport | tuple[FileReport, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        return FileReport(self.paths[i], *self.findings[self.index[i]])

    def __iter__(self) -> Iterator[FileReport]:
        findings = self.findings
        return (FileReport(p, *findings[k]) for p, k in zip(self.paths, self.index))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ReportTable):
            return self.paths == other.paths and [self.findings[k] for k in self.index] == [
                other.findings[k] for k in other.index]
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.paths, tuple(self.findings[k] for k in self.index)))

    def __repr__(self) -> str:
        return f"ReportTable({len(self)} reports, {len(self.findings)} distinct findings)"

    def kind_counts(self) -> Counter[str]:
        """Reports per kind (kinds without a report are absent)."""
        counts: Counter[str] = Counter()
        for k, n in Counter(self.index).items():
            counts[self.findings[k][0]] += n
        return counts

    def of_kinds(self, kinds: Iterable[str]) -> tuple[FileReport, ...]:
        """The reports of the given kinds, in table order."""
        kinds = frozenset(kinds)
        wanted = {k for k, finding in enumerate(self.findings) if finding[0] in kinds}
        if not wanted:
            return ()
        findings = self.findings
        return tuple(FileReport(p, *findings[k]) for p, k in zip(self.paths, self.index) if k in wanted)

    def ok_paths(self) -> frozenset[str]:
        """The paths whose report lets a loader read the file (kind ``ok`` or ``converted``)."""
        usable = {k for k, finding in enumerate(self.findings) if finding[0] in _USABLE_KINDS}
        if len(usable) == len(self.findings):
            return frozenset(self.paths)
        return frozenset(p for p, k in zip(self.paths, self.index) if k in usable)

    def sorted_by_path(self) -> ReportTable:
        order = sorted(range(len(self.paths)), key=self.paths.__getitem__)
        return ReportTable([self.paths[i] for i in order], [self.index[i] for i in order], self.findings)

    def __add__(self, other: ReportTable) -> ReportTable:
        if not isinstance(other, ReportTable):
            return NotImplemented
        ids = {finding: k for k, finding in enumerate(self.findings)}
        remap = [ids.setdefault(finding, len(ids)) for finding in other.findings]
        return ReportTable(self.paths + other.paths, self.index + tuple(remap[k] for k in other.index), list(ids))


@dataclass(frozen=True)
class ScanResult:
    """All reports of one scan, in input order (:func:`scan_files`) or path order (:func:`scan_tree`).

    ``empty_dirs`` lists folders holding no image file and no subfolder (from :func:`scan_tree`);
    ``cached_count`` is how many verdicts came from the manifest without opening the file.
    ``reports`` may be given as any iterable of reports; it is kept as a :class:`ReportTable`.
    """

    reports: ReportTable
    empty_dirs: tuple[str, ...] = ()
    cached_count: int = 0

    def __post_init__(self) -> None:
        # Normalised once, here, so every property below can work on the table's indices.
        if not isinstance(self.reports, ReportTable):
            object.__setattr__(self, "reports", ReportTable.from_reports(self.reports))
        object.__setattr__(self, "empty_dirs", tuple(self.empty_dirs))

    @property
    def bad(self) -> tuple[FileReport, ...]:
        return self.reports.of_kinds((KIND_BAD,))

    @property
    def converted(self) -> tuple[FileReport, ...]:
        return self.reports.of_kinds((KIND_CONVERTED,))

    @property
    def ignored(self) -> tuple[FileReport, ...]:
        return self.reports.of_kinds((KIND_IGNORED,))

    @property
    def good_paths(self) -> frozenset[str]:
        """Absolute paths of the files a loader may read (kind ``ok`` or ``converted``)."""
        return self.reports.ok_paths()

    @property
    def ok(self) -> bool:
        """No bad file. Ignored files and empty folders are not errors at this level: whether an
        empty class folder is fatal is the dataset layout's decision."""
        return not self.reports.kind_counts()[KIND_BAD]

    def counts(self) -> dict[str, int]:
        found = self.reports.kind_counts()
        return {kind: found[kind] for kind in (KIND_OK, KIND_CONVERTED, KIND_BAD, KIND_IGNORED)}

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
