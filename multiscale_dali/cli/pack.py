"""``msdali pack``: pack an ImageFolder once into WebDataset tar shards that `train --data` reads."""

from __future__ import annotations

from pathlib import Path

import click

from multiscale_dali.cli.params import BYTE_SIZE, FRACTIONS
from multiscale_dali.cli.progress import bars_enabled
from multiscale_dali.constants import DEFAULT_SPLIT_FRACTIONS
from multiscale_dali.training.config import BAD_FILE_POLICIES

# data.shards.DEFAULT_SHARD_BYTES as --help shows it, without importing the packer (it brings torch);
# tests hold the two equal.
DEFAULT_SHARD_SIZE = "256MB"


class StageProgress:
    """``on_progress(stage, done, total)`` of the packer as one bar per stage (scan, then pack)."""

    def __init__(self) -> None:
        self._stage: str | None = None
        self._bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from multiscale_dali.reporting.progress import CountProgress

        if stage != self._stage:
            self.close()
            unit = "file" if stage == "scan" else "sample"
            self._stage, self._bar = stage, CountProgress(desc=stage, unit=unit, enabled=bars_enabled())
        self._bar(done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_source(root: Path) -> None:
    from multiscale_dali.data.discovery import DataError
    from multiscale_dali.data.packed import is_packed_dir

    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    if is_packed_dir(root):
        raise DataError(f"{root} is already a packed directory: train on it with msdali train --data {root}")


def _check_replace(out: Path, *, root: Path, seed: int, fractions: tuple[float, ...], shard_bytes: int,
                   overwrite: bool) -> None:
    """Refuse to replace a complete pack made from another source or with other settings, unless asked to."""
    from multiscale_dali.data.shards import PackOutputError, pack_differences

    differences = pack_differences(out, source_root=str(root), seed=seed, split_fractions=fractions,
                                   shard_bytes=shard_bytes)
    if differences and not overwrite:
        raise PackOutputError(f"{out} already holds another pack ({'; '.join(differences)}); pack into another "
                              f"directory, or pass --overwrite to replace it")
    if differences:
        click.echo(f"replacing the pack in {out} ({'; '.join(differences)})", err=True)


@click.command()
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="ImageFolder to pack (class subfolders, optional train/val/test).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of the pack: new, empty, or an earlier pack of the same folder.")
@click.option("--shard-size", type=BYTE_SIZE, default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Largest size of one tar shard (K/M/G units are powers of 1024).")
@click.option("--split-fractions", type=FRACTIONS, default=None,
              help="train,val,test fractions when --data has no train/val/test folders. "
                   f"[default: {','.join(map(str, DEFAULT_SPLIT_FRACTIONS))}]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the split and of the stored sample order.")
@click.option("--on-bad-file", type=click.Choice(BAD_FILE_POLICIES), default="error", show_default=True,
              help="Unreadable images found by the scan: stop before writing anything, or leave them out.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None,
              help="Reject images whose header claims more pixels (decompression bombs).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads that decode (scan), read and re-encode.")
@click.option("--overwrite", is_flag=True, help="Replace a pack of another folder or other settings in --out.")
def pack(data: Path, out: Path, shard_size: int, split_fractions: tuple[float, ...] | None, seed: int,
         on_bad_file: str, max_image_pixels: int | None, workers: int, overwrite: bool) -> None:
    """Pack an ImageFolder into tar shards per split, with DALI index files and a manifest.

    Every image is scanned once with the rules of `msdali scan`; JPEGs are stored as they are, other
    usable files as the RGB JPEG the loaders would see. The manifest is written last: a killed pack
    leaves none, and running the same command again starts it over. Then: msdali train --data OUT.
    """
    from multiscale_dali.constants import DEFAULT_MAX_PIXELS
    from multiscale_dali.data.discovery import discover_dataset
    from multiscale_dali.data.shards import pack_dataset
    from multiscale_dali.training.run import scan_cache_path

    _check_source(data)
    fractions = split_fractions or DEFAULT_SPLIT_FRACTIONS
    splits = discover_dataset(data, fractions=fractions, seed=seed)
    _check_replace(out, root=data, seed=seed, fractions=fractions, shard_bytes=shard_size, overwrite=overwrite)
    with StageProgress() as progress:
        manifest = pack_dataset(splits=splits, out=out, seed=seed, shard_bytes=shard_size, on_bad_file=on_bad_file,
                                max_pixels=max_image_pixels or DEFAULT_MAX_PIXELS, workers=workers,
                                scan_cache=scan_cache_path(data), on_progress=progress, split_fractions=fractions)
    for split in manifest.splits:
        click.echo(f"{split.name:5} {split.samples:>9,} samples in {len(split.shards):>5,} shard(s), "
                   f"{sum(s.bytes for s in split.shards) / 2**20:,.1f} MiB")
    if manifest.scan.skipped:
        click.echo(f"left out {len(manifest.scan.skipped)} bad file(s), listed in {out}/manifest.json")
    if manifest.scan.reencoded:
        click.echo(f"re-encoded {len(manifest.scan.reencoded)} non-JPEG or converted file(s) as JPEG")
    click.echo(f"packed {data} into {out}; next: msdali train --data {out}")
