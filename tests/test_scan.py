"""Pre-training vetting of image files (multiscale_dali.data.scan) against a zoo of broken inputs."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from bad_images import (
    EMPTY_CLASS_DIR,
    EXPECTED,
    HEIGHT,
    IGNORED_NAME,
    PNG_RGB,
    WIDTH,
    png_bytes,
    write_zoo,
    zoo_paths,
)
from multiscale_dali.data import scan
from multiscale_dali.data.scan import (
    DEFAULT_MAX_PIXELS,
    BadImagesError,
    FileReport,
    ScanResult,
    filter_good,
    scan_files,
    scan_tree,
)

# Generous bound for refusing the bomb: a header read takes microseconds, while decoding the
# 100000 x 100000 image it claims would take minutes (or fail allocating 30 GB).
BOMB_SECONDS = 1.0
# Files of the zoo whose verdict needs Image.open (everything with a recognised, supported
# signature): the cache test counts these opens.
OPENED_BY_SCAN = tuple(n for n in EXPECTED if n not in ("zero.jpg", "text.jpg", "gif_named.png"))


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """The dataset root; the zoo's files are in ``root/train/cat``."""
    root = tmp_path / "data"
    write_zoo(root)
    return root


@pytest.fixture
def paths(zoo: Path) -> dict[str, str]:
    return zoo_paths(zoo / "train" / "cat")


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the file name of every ``Image.open`` call the scanner makes."""
    calls: list[str] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        calls.append(os.path.basename(os.fspath(fp)))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return calls


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the file name of every full decode (``ImageFile.load``)."""
    calls: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        calls.append(os.path.basename(getattr(self, "filename", "") or ""))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def _assert_matches(report: FileReport, expected) -> None:
    name = os.path.basename(report.path)
    assert report.kind == expected.kind, f"{name}: {report}"
    assert report.ok == (expected.kind in ("ok", "converted")), name
    if expected.reason_prefix:
        assert report.reason.startswith(expected.reason_prefix + ": "), f"{name}: {report.reason!r}"
    else:
        assert report.reason == "", f"{name}: {report.reason!r}"
    assert expected.note_contains in report.note, f"{name}: {report.note!r}"
    if expected.fmt:
        assert report.format == expected.fmt, f"{name}: {report.format!r}"


def test_scan_tree_classifies_every_file(zoo: Path) -> None:
    result = scan_tree(zoo, workers=2)
    by_name = {os.path.basename(r.path): r for r in result.reports}

    assert set(by_name) == set(EXPECTED) | {IGNORED_NAME}  # the hidden .DS_Store is not listed
    for name, expected in EXPECTED.items():
        _assert_matches(by_name[name], expected)
    for name in ("rgb.jpg", "cmyk.jpg", "rgba.png", "gray16.png"):
        assert (by_name[name].width, by_name[name].height) == (WIDTH, HEIGHT)

    notes = by_name[IGNORED_NAME]
    assert notes.kind == "ignored" and not notes.ok
    assert notes.reason == f"{scan.REASON_NOT_IMAGE_EXTENSION}: .txt"

    assert result.empty_dirs == (str(zoo / EMPTY_CLASS_DIR),)
    assert not result.ok
    assert {os.path.basename(r.path) for r in result.bad} == {n for n, e in EXPECTED.items() if e.kind == "bad"}
    assert result.good_paths == {r.path for r in result.reports if r.kind in ("ok", "converted")}
    assert [r.path for r in result.reports] == sorted(r.path for r in result.reports)
    with pytest.raises(BadImagesError, match="truncated.jpg: truncated or corrupt"):
        result.raise_for_bad()


def test_scan_files_judges_content_not_extension(zoo: Path, paths: dict[str, str]) -> None:
    # A file handed over explicitly is judged by content, whatever its name says.
    result = scan_files([str(zoo / IGNORED_NAME), paths["png_named.jpg"], paths["rgb.jpg"]], workers=1)
    notes, png, jpeg = result.reports
    assert notes.kind == "bad" and notes.reason.startswith(scan.REASON_NOT_IMAGE)
    assert (png.format, jpeg.format) == ("PNG", "JPEG")
    assert scan_files([paths["rgb.jpg"], paths["rgb.jpg"]]).reports == (jpeg,)  # duplicates once
    missing = scan_files([str(zoo / "nope.jpg")]).reports[0]
    assert missing.kind == "bad" and missing.reason.startswith(scan.REASON_UNREADABLE)


def test_bomb_is_refused_from_its_header(paths: dict[str, str], loaded: list[str]) -> None:
    assert os.path.getsize(paths["bomb.png"]) < 100  # claims 10^10 pixels, holds a few bytes
    start = time.perf_counter()
    report = scan_files([paths["bomb.png"]]).reports[0]
    assert time.perf_counter() - start < BOMB_SECONDS
    assert report.kind == "bad" and report.reason.startswith(scan.REASON_BOMB + ": ")
    assert "bomb.png" not in loaded  # refused before any pixel was decoded


def test_bomb_is_refused_by_our_own_check_when_pillow_has_no_limit(
    paths: dict[str, str], loaded: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    report = scan_files([paths["bomb.png"]]).reports[0]
    assert report.kind == "bad" and report.reason.startswith(scan.REASON_BOMB)
    assert (report.width, report.height) == (100_000, 100_000)
    assert loaded == []


def test_overlong_side_is_refused_even_under_the_pixel_limit(tmp_path: Path, loaded: list[str]) -> None:
    # 1,000,001 x 1 is a small image by pixel count, but DALI's decoders refuse such a side.
    strip = tmp_path / "strip.png"
    strip.write_bytes(png_bytes(scan.MAX_IMAGE_SIDE + 1, 1, bit_depth=8, color_type=PNG_RGB, idat=b""))
    report = scan_files([strip]).reports[0]
    assert report.kind == "bad" and report.reason.startswith(scan.REASON_BOMB) and "side" in report.reason
    assert loaded == []


def test_own_pixel_limit_is_checked_before_decoding(paths: dict[str, str], loaded: list[str]) -> None:
    report = scan_files([paths["rgb.jpg"]], max_pixels=WIDTH * HEIGHT - 1).reports[0]
    assert report.kind == "bad" and report.reason.startswith(scan.REASON_BOMB)
    assert (report.width, report.height) == (WIDTH, HEIGHT)  # header read, pixels not
    assert loaded == []
    assert scan_files([paths["rgb.jpg"]], max_pixels=WIDTH * HEIGHT).reports[0].kind == "ok"


def test_pillow_bomb_warning_is_an_error_only_during_the_scan(
    paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns, and would go on to decode the image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", WIDTH * HEIGHT * 3 // 4)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # e.g. set for a torchvision loader
    filters_before, showwarning_before = list(warnings.filters), warnings.showwarning

    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        result = scan_files([paths["rgb.jpg"], paths["truncated.jpg"]])
    assert warnings.filters == filters_before and warnings.showwarning is showwarning_before

    bomb, truncated = result.reports
    assert bomb.kind == "bad" and bomb.reason.startswith(scan.REASON_BOMB)
    assert "Pillow's Image.MAX_IMAGE_PIXELS" in bomb.reason  # refused by Image.open itself
    assert not [w for w in escaped if issubclass(w.category, Image.DecompressionBombWarning)]
    assert truncated.kind == "bad" and truncated.reason.startswith(scan.REASON_CORRUPT)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert scan.effective_max_pixels(DEFAULT_MAX_PIXELS) == WIDTH * HEIGHT * 3 // 4


def test_cache_skips_unchanged_files_and_rechecks_changed_ones(
    zoo: Path, paths: dict[str, str], opened: list[str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "scan.json"
    files = list(paths.values())
    first = scan_files(files, cache_path=cache)
    assert first.cached_count == 0
    assert set(opened) == set(OPENED_BY_SCAN)  # (a decodable PNG is opened twice, for verify())
    assert not list(cache.parent.glob("*.tmp"))  # the temp file was renamed over the manifest

    opened.clear()
    second = scan_files(files, cache_path=cache)
    assert second.cached_count == len(files) and opened == []
    assert second.reports == first.reports

    # Same size, new mtime: re-checked. New content: re-checked, and the verdict changes.
    os.utime(paths["rgb.jpg"], ns=(time.time_ns(), os.stat(paths["rgb.jpg"]).st_mtime_ns + 1_000_000_000))
    Path(paths["cmyk.jpg"]).write_bytes(Path(paths["truncated.jpg"]).read_bytes())
    opened.clear()
    third = scan_files(files, cache_path=cache)
    assert sorted(opened) == ["cmyk.jpg", "rgb.jpg"]
    assert third.cached_count == len(files) - 2
    by_name = {os.path.basename(r.path): r for r in third.reports}
    assert by_name["rgb.jpg"].kind == "ok" and by_name["cmyk.jpg"].kind == "bad"

    # The pixel limit is part of the key.
    assert scan_files(files, cache_path=cache, max_pixels=DEFAULT_MAX_PIXELS - 1).cached_count == 0


def test_corrupt_cache_is_ignored(paths: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "scan.json"
    cache.write_text('{"format": "multiscale_dali.data.scan/manifest", "entr')  # torn by a crash
    with caplog.at_level(logging.WARNING, logger="multiscale_dali.data.scan.cache"):
        result = scan_files([paths["rgb.jpg"]], cache_path=cache)
    assert result.cached_count == 0 and result.reports[0].kind == "ok"
    assert any(str(cache) in message for message in caplog.messages)
    assert scan_files([paths["rgb.jpg"]], cache_path=cache).cached_count == 1  # rewritten whole


def test_manifest_and_result_json_round_trip(zoo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "scan.json"
    result = scan_tree(zoo, cache_path=cache)
    assert ScanResult.from_json(result.to_json()) == result

    manifest = json.loads(cache.read_text())
    assert manifest["version"] == 2
    scanned = {r.path: r for r in result.reports if r.kind != "ignored"}
    cached = {}
    for directory, record in manifest["dirs"].items():
        assert record["names"] == sorted(record["names"]) and record["limit"] == DEFAULT_MAX_PIXELS
        for i, name in enumerate(record["names"]):
            path = os.path.join(directory, name)
            cached[path] = FileReport(path, *record["findings"][record["index"][i]])
            assert record["keys"][2 * i : 2 * i + 2] == [os.stat(path).st_size, os.stat(path).st_mtime_ns]
    assert cached == scanned


def test_filter_good_keeps_labels_aligned(
    paths: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    result = scan_files(paths.values())
    names = ["rgb.jpg", "truncated.jpg", "cmyk.jpg", "zero.jpg", "bomb.png", "rgba.png", "text.jpg"]
    labels = [0, 0, 1, 1, 2, 2, 3]
    monkeypatch.chdir(Path(paths["rgb.jpg"]).parent)  # relative paths are matched too
    with caplog.at_level(logging.WARNING, logger="multiscale_dali.data.scan.tree"):
        files, kept = filter_good(names, labels, result)
    assert files == ("rgb.jpg", "cmyk.jpg", "rgba.png")
    assert kept == (0, 1, 2)
    assert any("label 3 lost all 1" in message for message in caplog.messages)

    with pytest.raises(ValueError, match="unscanned.jpg was not scanned"):
        filter_good(["unscanned.jpg"], [0], result)
    with pytest.raises(ValueError, match="2 files but 1 labels"):
        filter_good(names[:2], labels[:1], result)


def test_symlink_loop_terminates(zoo: Path) -> None:
    os.symlink(zoo, zoo / "train" / "loop")
    result = scan_tree(zoo)
    assert sum(1 for r in result.reports if r.path.endswith("rgb.jpg")) == 1


# --------------------------------------------------------------------------------------------
# The verdicts are safe for the DALI backend: it decodes every file the scan lets through, and
# fails on the files the scan rejects for being unreadable.


def _dali_decode(path: str) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded, _ = fn.readers.file(files=[path], labels=[0])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    return np.asarray(images.at(0))


def test_dali_decodes_every_file_the_scan_accepts(zoo: Path) -> None:
    pytest.importorskip("nvidia.dali")
    result = scan_tree(zoo)
    assert len(result.good_paths) == sum(1 for e in EXPECTED.values() if e.kind != "bad")
    for report in result.reports:
        if not report.ok:
            continue
        image = _dali_decode(report.path)
        # DALI applies EXIF orientation (Pillow does not for JPEG): a 90-degree turn swaps sides.
        rotated = "EXIF orientation 6" in report.note
        expected = (report.width, report.height) if rotated else (report.height, report.width)
        assert image.shape == (*expected, 3), report.path


# Mutants per format in the fuzz test below: enough to hit header, tag and chunk damage (each of
# which once let a file through that DALI then refused), small enough to stay near a second.
FUZZ_MUTANTS_PER_FORMAT = 30
FUZZ_MAX_FLIPS = 4
FUZZ_HEADER_BYTES = 400  # most mutations land in headers, where the decoders disagree most
FUZZ_TRUNCATE_PROBABILITY = 0.2


def test_scan_never_accepts_a_damaged_file_that_dali_rejects(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    rng = np.random.default_rng(2024)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = Image.fromarray(np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8))
    bases: dict[str, bytes] = {}
    for suffix in (".jpg", ".png", ".tif", ".webp", ".bmp"):
        base = tmp_path / f"base{suffix}"
        pixels.save(base)
        bases[suffix] = base.read_bytes()
    mutants: list[Path] = []
    for suffix, data in bases.items():
        for index in range(FUZZ_MUTANTS_PER_FORMAT):
            damaged = bytearray(data)
            for _ in range(int(rng.integers(1, FUZZ_MAX_FLIPS + 1))):
                span = min(len(damaged), FUZZ_HEADER_BYTES) if rng.random() < 0.7 else len(damaged)
                damaged[int(rng.integers(0, span))] = int(rng.integers(0, 256))
            if rng.random() < FUZZ_TRUNCATE_PROBABILITY:
                damaged = damaged[: int(rng.integers(1, len(damaged)))]
            path = tmp_path / f"mutant_{index:03d}{suffix}"
            path.write_bytes(bytes(damaged))
            mutants.append(path)

    result = scan_files(mutants)
    accepted = [r for r in result.reports if r.ok]
    assert accepted and result.bad  # the seed produces both outcomes
    for report in accepted:
        image = _dali_decode(report.path)  # raises if DALI disagrees with the scan
        assert image.shape == (report.height, report.width, 3), report


def test_plain_pillow_would_let_these_bad_files_through(paths: dict[str, str]) -> None:
    # Why the scan needs its own checks: with default settings Pillow decodes all of these.
    for name, expected in EXPECTED.items():
        if expected.pillow_loads:
            with Image.open(paths[name]) as image:
                image.load()


def test_dali_fails_on_the_unreadable_files_the_scan_rejects(paths: dict[str, str]) -> None:
    pytest.importorskip("nvidia.dali")
    for name, expected in EXPECTED.items():
        if expected.dali_fails:  # never the bomb: DALI has no pixel cap
            with pytest.raises(RuntimeError):
                _dali_decode(paths[name])
