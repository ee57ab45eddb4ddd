"""``msdali scan``: check every file by content before training, and say what is bad; verify a pack."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from multiscale_dali.cli.progress import bars_enabled
from multiscale_dali.data.discovery import DataError


def _verify_if_packed(root: Path) -> bool:
    """Deep-verify ``root`` when it is a pack (a damaged one raises ``ShardError``); False for a folder."""
    from multiscale_dali.data.packed import is_packed_dir, load_packed
    from multiscale_dali.data.shard_verify import verify_shards
    from multiscale_dali.reporting.progress import CountProgress

    if not is_packed_dir(root):
        return False
    manifest = load_packed(root).manifest
    with CountProgress(desc="verify", unit="shard", enabled=bars_enabled()) as progress:
        result = verify_shards(manifest, deep=True, on_progress=progress)
    click.echo(f"pack {root}: {result.shards} shard(s), {result.samples} samples verified against "
               f"{root / 'manifest.json'} (checksums, members, keys, labels)")
    if manifest.scan.skipped:
        click.echo(f"{len(manifest.scan.skipped)} bad file(s) of {manifest.source_root} were left out when it was packed")
    return True


@click.command()
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Folder to scan (every file under it), or a packed directory to verify. "
                   "Default: the embedded texture photos.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None, help="Decompression-bomb cap, from the header.")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="Also write the full report as JSON here.")
def scan(data: str | None, max_image_pixels: int | None, manifest: str | None) -> None:
    """Check every file by content before training: what is bad, what will be converted.

    Exit code 1 when a bad image is found. Results are cached per file (size, mtime), so a
    second scan of unchanged files decodes nothing; `msdali train` runs the same scan.

    A packed directory (from `msdali pack`) is verified instead: every shard's checksum, members,
    keys and labels against its manifest; a problem is one line naming the shard and key (exit 2).
    """
    from multiscale_dali.data.scan import DEFAULT_MAX_PIXELS, scan_tree
    from multiscale_dali.fileio import atomic_write_text
    from multiscale_dali.reporting.progress import CountProgress
    from multiscale_dali.training.config import TrainConfig
    from multiscale_dali.training.run import dataset_root, scan_cache_path

    root = Path(data) if data else dataset_root(TrainConfig())
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    if _verify_if_packed(root):
        return
    max_pixels = DEFAULT_MAX_PIXELS if max_image_pixels is None else max_image_pixels
    with CountProgress(desc="scan", unit="file", enabled=bars_enabled()) as progress:
        result = scan_tree(root, max_pixels=max_pixels, cache_path=scan_cache_path(root), on_progress=progress)
    for report in result.bad:
        click.echo(f"BAD       {report.path}: {report.reason}")
    for report in result.converted:
        click.echo(f"converted {report.path}: {report.note}")
    for report in result.ignored:
        click.echo(f"ignored   {report.path}: {report.reason}")
    for folder in result.empty_dirs:
        click.echo(f"empty     {folder}")
    if manifest:
        atomic_write_text(manifest, result.to_json())
    counts = result.counts()
    click.echo(", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" ({result.cached_count} from cache)")
    if result.bad:
        sys.exit(1)
