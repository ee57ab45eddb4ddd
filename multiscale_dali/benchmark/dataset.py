"""The files a benchmark reads: a user folder, synthetic JPEGs or the embedded photos; their
description, and a read of each beforehand so every backend starts from a warm page cache."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from multiscale_dali.benchmark.config import BYTES_PER_KIB
from multiscale_dali.errors import EXIT_FAILURE, UserError

# Block size of the page-cache warm-up reads.
PAGE_CACHE_READ_BYTES = 1 << 20
# Header reads for the dataset description: enough for a mean, cheap on a large folder.
DESCRIBE_MAX_FILES = 200


class BenchDataError(UserError, ValueError, flag="--data", exit_code=EXIT_FAILURE):
    """The benchmark's folder holds images no backend can decode; the message lists them."""


@dataclass(frozen=True)
class BenchData:
    """The files chosen for a run, with where they came from."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    num_classes: int
    source: str


def resolve_data(*, data: Path | None, synthetic: int | None, cache_dir: Path | None = None) -> BenchData:
    """The files to read: ``data`` (its train split, or every image of a flat folder), ``synthetic``
    JPEGs from the cache, or the embedded texture photos' train split."""
    from multiscale_dali.data.discovery import discover_dataset

    if data is not None and synthetic is not None:
        raise ValueError("give either data or synthetic, not both")
    if synthetic is not None:
        from multiscale_dali.data.synthetic import cached_synthetic_jpegs

        root, source = cached_synthetic_jpegs(count=synthetic, cache_dir=cache_dir), f"synthetic x{synthetic}"
    elif data is not None:
        root, source = Path(data), "user folder"
    else:
        from multiscale_dali.data.embedded import default_dataset

        root, source = default_dataset(cache_dir=cache_dir), "embedded texture photos (train split)"
    splits = discover_dataset(root)
    if splits.explicit_splits or (root / "train").is_dir():
        files, labels = splits.train.files, splits.train.labels
    else:  # a flat ImageFolder was split by discover_dataset: benchmark every image
        parts = (splits.train, splits.val, splits.test)
        files = tuple(f for p in parts for f in p.files)
        labels = tuple(label for p in parts for label in p.labels)
    return BenchData(root=Path(root), files=files, labels=labels, num_classes=splits.num_classes, source=source)


def describe_files(files: Sequence[str]) -> dict[str, Any]:
    """Mean file size and image size (from the headers of at most ``DESCRIBE_MAX_FILES`` files)."""
    sample = list(files)[:DESCRIBE_MAX_FILES]
    sizes = []
    for path in sample:
        with Image.open(path) as image:  # lazy: reads the header only
            sizes.append(image.size)
    return {
        "mean_file_kib": round(statistics.mean(os.path.getsize(p) for p in sample) / BYTES_PER_KIB, 1),
        "mean_width": round(statistics.mean(w for w, _ in sizes)),
        "mean_height": round(statistics.mean(h for _, h in sizes)),
    }


def warm_page_cache(files: Iterable[str]) -> None:
    """Read every file once so no backend pays for the disk the others then get for free."""
    for path in set(files):
        with open(path, "rb") as handle:
            while handle.read(PAGE_CACHE_READ_BYTES):
                pass


def check_readable(data: BenchData) -> None:
    """The pre-flight scan ``msdali train`` runs (cached per file): a DALI pipeline stops at the first
    bad image with a message that may not name it, so the files are vetted before any loader starts."""
    from multiscale_dali.data.scan import scan_files
    from multiscale_dali.training.run_data import scan_cache_path

    result = scan_files(data.files, cache_path=scan_cache_path(data.root))
    if result.bad:
        raise BenchDataError(f"{data.root}: {len(result.bad)} file(s) cannot be decoded by every backend; fix or "
                             f"remove them (`msdali scan --data {data.root}` lists every problem):\n"
                             f"{result.describe_bad()}")
