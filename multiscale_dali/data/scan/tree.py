"""Scans of a file list or a folder tree: stat keys against the cache, verdicts on worker threads,
the summary log, and keeping only the files a loader may read."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image

from multiscale_dali.constants import DEFAULT_MAX_PIXELS
from multiscale_dali.data.discovery import is_image_file
from multiscale_dali.data.walk import walk_dataset
from multiscale_dali.data.scan.cache import Manifest
from multiscale_dali.data.scan.lookup import CacheLookup, unique_abs_paths
from multiscale_dali.data.scan.report import (
    KIND_BAD,
    KIND_CONVERTED,
    KIND_IGNORED,
    KIND_OK,
    MAX_LOGGED_PROBLEMS,
    FileReport,
    ReportTable,
    ScanResult,
)
from multiscale_dali.data.scan.rules import Verdict, check_file, ignored_report
from multiscale_dali.data.scan.strict import strict_pillow

logger = logging.getLogger(__name__)

# Pillow releases the GIL while decoding, so threads overlap decodes; two matches the 2-core
# machines this project targets and leaves a scan from hogging a shared training node.
DEFAULT_SCAN_WORKERS: int = 2
# Files handed to the scan threads at a time: enough to keep them busy, few enough that the pending
# work of a million-file first scan stays small.
SCAN_CHUNK: int = 1024


def effective_max_pixels(max_pixels: int) -> int:
    """The pixel limit a scan really applies: ``max_pixels``, capped by Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (when set) because Pillow refuses larger images at open time, and
    the torchvision backend decodes with Pillow. Raise both to accept larger images."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, int(pillow_limit))


def scan_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_path: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_SCAN_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Check each file by content, whatever its extension, and return one report per file.

    A file is ``bad`` when it is empty, unreadable, not an image, of a format outside JPEG / PNG /
    BMP / TIFF / WebP, of a pixel format the backends disagree on, larger than the pixel limit
    (checked on the header, before any pixel is decoded), or truncated/corrupt (a full decode
    fails). Duplicate paths are reported once. With ``cache_path``, verdicts of files whose
    (size, mtime_ns, pixel limit) are unchanged are reused without opening the file, and the
    manifest is rewritten atomically. ``on_progress(done, total)`` follows the files that are
    actually decoded (a progress bar for a first scan of a large dataset).

    For the duration of the call, Pillow's ``DecompressionBombWarning`` is an error and
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False; both are restored afterwards. Those are
    process-wide settings, so do not run a scan while another thread decodes with Pillow under
    different settings.
    """
    limit = _checked_limit(max_pixels=max_pixels, workers=workers)
    abs_paths = unique_abs_paths(paths)
    manifest = Manifest.load(Path(cache_path) if cache_path is not None else None)
    lookup = CacheLookup(abs_paths, manifest, limit=limit)
    verdicts = _check_all([p.path for p in lookup.pending], limit=limit, workers=workers, on_progress=on_progress)
    # strict: zip then also runs the generator to its end, which restores Pillow's settings.
    for pending, verdict in zip(lookup.pending, verdicts, strict=True):
        lookup.settle(pending, verdict.report, cacheable=verdict.cacheable)
    lookup.store()
    manifest.save()

    result = ScanResult(reports=lookup.table(), cached_count=lookup.cached_count)
    _log_summary(result)
    return result


def _checked_limit(*, max_pixels: int, workers: int) -> int:
    """The effective pixel limit, after checking the arguments of a scan."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    limit = effective_max_pixels(max_pixels)
    if limit < max_pixels:
        logger.info(
            "pixel limit %d is capped at Pillow's Image.MAX_IMAGE_PIXELS = %d; raise that too to accept larger images",
            max_pixels, limit,
        )
    return limit


def _check_all(to_check: Sequence[str], *, limit: int, workers: int,
               on_progress: Callable[[int, int], None] | None) -> Iterator[Verdict]:
    """The verdicts on the files ``to_check``, yielded in order, decoded on ``workers`` threads under
    strict Pillow settings (consume them all: the settings hold until the generator finishes).

    Files go to the threads ``SCAN_CHUNK`` at a time: ``Executor.map`` submits everything it is
    given at once, and a million pending futures and their results would cost gigabytes."""

    def check(path: str) -> Verdict:
        return check_file(path, max_pixels=limit)

    if not to_check:
        return
    done = 0
    with strict_pillow():
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            try:
                for start in range(0, len(to_check), SCAN_CHUNK):
                    chunk = to_check[start : start + SCAN_CHUNK]
                    # map() yields in order on this thread, so the progress callback never runs concurrently.
                    for verdict in (map(check, chunk) if workers == 1 else pool.map(check, chunk)):
                        done += 1
                        if on_progress is not None:
                            on_progress(done, len(to_check))
                        yield verdict
            except BaseException:
                # A stop signal (or an error): drop the queued files instead of decoding them all first.
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def scan_tree(
    root: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_path: str | os.PathLike[str] | None = None,
    workers: int = DEFAULT_SCAN_WORKERS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan every regular, non-hidden file below ``root`` (recursively, following symlinks as dataset
    discovery does, see :func:`~multiscale_dali.data.walk.walk_dataset`) and report folders
    that hold no image file and no subfolder.

    Files with an image extension are checked by content as in :func:`scan_files`; any other file
    is reported as ``ignored`` (dataset discovery never loads it), with a note when its content
    is nevertheless an image. Reports are sorted by path.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"cannot scan {root_path}: not a directory")
    image_files: list[str] = []
    ignored: list[FileReport] = []
    empty_dirs: list[str] = []
    for dirpath, subdirs, filenames in walk_dataset(os.path.abspath(root_path)):
        images = [name for name in filenames if is_image_file(name)]
        image_files += [dirpath + os.sep + name for name in images]
        if len(images) < len(filenames):
            ignored += [ignored_report(dirpath + os.sep + name) for name in filenames if not is_image_file(name)]
        if not images and not subdirs:
            empty_dirs.append(dirpath)
    for folder in empty_dirs:
        logger.warning("empty folder (no image files, no subfolders): %s", folder)

    scanned = scan_files(image_files, max_pixels=max_pixels, cache_path=cache_path, workers=workers,
                         on_progress=on_progress)
    reports = (scanned.reports + ReportTable.from_reports(ignored)).sorted_by_path()
    return ScanResult(reports=reports, empty_dirs=tuple(sorted(empty_dirs)), cached_count=scanned.cached_count)


def filter_good(
    files: Sequence[str | os.PathLike[str]],
    labels: Sequence[int],
    result: ScanResult,
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Keep the files ``result`` marks usable, each with its own label, in the original order.

    Raises ``ValueError`` when the sequences differ in length or a file was never scanned (a
    silent keep or drop would hide a bug in the caller). Logs a warning for every label that
    loses all of its files, since the class then still exists but can never be predicted from data.
    """
    if len(files) != len(labels):
        raise ValueError(f"filter_good: {len(files)} files but {len(labels)} labels")
    scanned = set(result.reports.paths)
    good = result.good_paths
    kept_files: list[str] = []
    kept_labels: list[int] = []
    for file, label in zip(files, labels):
        abs_path = unique_abs_paths([file])[0]
        if abs_path not in scanned:
            raise ValueError(f"filter_good: {file} was not scanned; scan every file before filtering")
        if abs_path in good:
            kept_files.append(os.fspath(file))
            kept_labels.append(label)
    emptied = sorted(set(labels) - set(kept_labels))
    for label in emptied:
        lost = sum(1 for lab in labels if lab == label)
        logger.warning("label %s lost all %d of its file(s) to the scan", label, lost)
    return tuple(kept_files), tuple(kept_labels)


def _log_summary(result: ScanResult) -> None:
    counts = result.counts()
    logger.info(
        "scanned %d file(s): %d ok, %d converted, %d bad, %d ignored (%d verdicts from cache)",
        len(result.reports), counts[KIND_OK], counts[KIND_CONVERTED], counts[KIND_BAD], counts[KIND_IGNORED],
        result.cached_count,
    )
    bad = result.bad
    for report in bad[:MAX_LOGGED_PROBLEMS]:
        logger.warning("bad image %s: %s", report.path, report.reason)
    if len(bad) > MAX_LOGGED_PROBLEMS:
        logger.warning("... and %d more bad file(s)", len(bad) - MAX_LOGGED_PROBLEMS)
