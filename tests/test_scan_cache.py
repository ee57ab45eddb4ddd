"""The scan cache keeps one record per directory: what it re-decodes, what it keeps, what it forgets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from multiscale_dali.data.scan import FileReport, ScanResult, scan_files, scan_tree
from multiscale_dali.data.scan.report import ReportTable
from multiscale_dali.data.tiny_tree import write_tiny_jpeg_tree

CLASSES = 3
PER_CLASS = 4


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """3 class folders of 4 tiny JPEGs each, every file its own inode (editing one edits only it)."""
    root = tmp_path / "data"
    write_tiny_jpeg_tree(root, files=CLASSES * PER_CLASS, classes=CLASSES, link=False)
    return root


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file the scanner opens with Pillow (a cached verdict opens nothing)."""
    calls: list[str] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        calls.append(os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return calls


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.jpg"))


def _records(cache: Path) -> dict[str, dict]:
    return json.loads(cache.read_text())["dirs"]


def _bump_mtime(path: str) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_unchanged_tree_is_confirmed_without_opening_a_file(tree: Path, tmp_path: Path, opened: list[str]) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    first = scan_files(files, cache_path=cache)
    assert first.cached_count == 0 and sorted(opened) == files
    written = cache.stat().st_mtime_ns

    opened.clear()
    second = scan_files(files, cache_path=cache)
    assert second.cached_count == len(files) and opened == []
    assert second == ScanResult(reports=first.reports, cached_count=len(files))
    assert cache.stat().st_mtime_ns == written  # nothing changed, nothing rewritten
    assert len(_records(cache)) == CLASSES


def test_modified_file_is_rescanned_and_only_its_directory_record_changes(
    tree: Path, tmp_path: Path, opened: list[str]
) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    before = _records(cache)

    touched, rewritten = files[0], files[1]  # same folder: a new mtime; new (truncated) content
    _bump_mtime(touched)
    content = Path(rewritten).read_bytes()
    Path(rewritten).write_bytes(content[: len(content) // 2])
    opened.clear()
    result = scan_files(files, cache_path=cache)

    assert sorted(opened) == sorted([touched, rewritten])
    assert result.cached_count == len(files) - 2
    assert [r.path for r in result.bad] == [rewritten]
    after = _records(cache)
    changed = {d for d in before if before[d] != after[d]}
    assert changed == {os.path.dirname(touched)}


def test_added_file_is_scanned_and_removed_file_is_forgotten(tree: Path, tmp_path: Path, opened: list[str]) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    folder = os.path.dirname(files[0])

    added = os.path.join(folder, "added.jpg")
    Path(added).write_bytes(Path(files[0]).read_bytes())
    os.remove(files[1])
    now = [f for f in files if f != files[1]] + [added]
    opened.clear()
    result = scan_files(now, cache_path=cache)

    assert opened == [added]
    assert result.cached_count == len(now) - 1 and result.ok
    assert _records(cache)[folder]["names"] == sorted(os.listdir(folder))
    opened.clear()
    assert scan_files(now, cache_path=cache).cached_count == len(now) and opened == []


def test_a_scan_of_some_files_keeps_the_verdicts_of_the_others(tree: Path, tmp_path: Path, opened: list[str]) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    scan_files(files[::2], cache_path=cache)  # e.g. one split only
    opened.clear()
    assert scan_files(files, cache_path=cache).cached_count == len(files) and opened == []


def test_vanished_file_is_unreadable_and_not_cached(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    os.remove(files[0])
    result = scan_files(files, cache_path=cache)
    assert [r.path for r in result.bad] == [files[0]]
    assert result.bad[0].reason.startswith("unreadable")
    assert os.path.basename(files[0]) not in _records(cache)[os.path.dirname(files[0])]["names"]


def test_records_of_deleted_folders_are_dropped(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    gone = os.path.dirname(files[0])
    for name in os.listdir(gone):
        os.remove(os.path.join(gone, name))
    os.rmdir(gone)
    _bump_mtime(files[-1])  # something to rewrite
    scan_files([f for f in files if not f.startswith(gone + os.sep)], cache_path=cache)
    assert gone not in _records(cache) and len(_records(cache)) == CLASSES - 1


def test_old_format_manifest_is_ignored_and_replaced(
    tree: Path, tmp_path: Path, opened: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    st = os.stat(files[0])
    # Version 1: one entry per file, no "version" field. Its verdict says "bad": were it trusted,
    # the file would be reported bad without being opened.
    old = {"format": "multiscale_dali.data.scan/manifest", "entries": {files[0]: {
        "key": [st.st_size, st.st_mtime_ns, 178956970],
        "report": {"path": files[0], "kind": "bad", "reason": "truncated or corrupt: old"}}}}
    cache.write_text(json.dumps(old))
    with caplog.at_level(logging.INFO, logger="multiscale_dali.data.scan.cache"):
        result = scan_files(files, cache_path=cache)
    assert result.cached_count == 0 and result.ok and sorted(opened) == files
    assert any("format version 1" in m for m in caplog.messages)
    assert json.loads(cache.read_text())["version"] == 2


def test_malformed_record_is_rescanned(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    payload = json.loads(cache.read_text())
    folder = os.path.dirname(files[0])
    payload["dirs"][folder]["index"] = [99] * PER_CLASS  # points past its findings
    cache.write_text(json.dumps(payload))
    result = scan_files(files, cache_path=cache)
    assert result.cached_count == len(files) - PER_CLASS and result.ok


def test_scan_tree_reuses_the_records_of_the_file_scan(tree: Path, tmp_path: Path, opened: list[str]) -> None:
    cache = tmp_path / "scan.json"
    (tree / "notes.txt").write_text("not an image")
    scan_files(_files(tree), cache_path=cache)
    opened.clear()
    result = scan_tree(tree, cache_path=cache)
    assert opened == [] and result.cached_count == CLASSES * PER_CLASS
    assert [r.path for r in result.reports] == sorted(r.path for r in result.reports)
    assert [r.kind for r in result.ignored] == ["ignored"]


def test_report_table_is_a_sequence_of_reports() -> None:
    reports = [FileReport("/d/b.jpg", "ok", format="JPEG", width=8, height=8),
               FileReport("/d/a.jpg", "bad", reason="empty file: 0 bytes"),
               FileReport("/d/c.jpg", "ok", format="JPEG", width=8, height=8)]
    table = ReportTable.from_reports(reports)
    assert len(table.findings) == 2  # the two ok files share one finding
    assert table == reports and list(table) == reports and table[1] == reports[1] and table[1:] == tuple(reports[1:])
    assert table.kind_counts() == {"ok": 2, "bad": 1}
    assert table.of_kinds(["bad"]) == (reports[1],)
    assert table.ok_paths() == {"/d/b.jpg", "/d/c.jpg"}
    assert [r.path for r in table.sorted_by_path()] == ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"]
    both = table + ReportTable.from_reports([FileReport("/e/x.png", "ok", format="PNG", width=8, height=8)])
    assert len(both) == 4 and len(both.findings) == 3 and both[3].format == "PNG"
    with pytest.raises(ValueError, match="outside"):
        ReportTable(["/a"], [1], [("ok", "", "", "JPEG", 1, 1)])


def test_cached_check_does_not_depend_on_input_order(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    files = _files(tree)
    scan_files(files, cache_path=cache)
    shuffled = files[1::2] + files[::2]
    result = scan_files(shuffled + [os.path.join(os.path.dirname(shuffled[0]), ".", os.path.basename(shuffled[0]))],
                        cache_path=cache)
    assert [r.path for r in result.reports] == shuffled  # input order, the duplicate once
    assert result.cached_count == len(files)



def test_a_folder_without_images_scans_to_an_empty_report(tmp_path):
    from multiscale_dali.data.scan import scan_tree

    (tmp_path / "empty").mkdir()
    result = scan_tree(tmp_path / "empty", cache_path=tmp_path / "cache.json")
    assert len(result.reports) == 0 and result.empty_dirs == (str(tmp_path / "empty"),)
