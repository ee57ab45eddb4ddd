"""Packing a dataset into WebDataset shards: content, order, determinism, atomicity, manifest, verify."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bad_images
from multiscale_dali import __version__
from multiscale_dali.data.discovery import DatasetSplits, SplitFiles, discover_dataset
from multiscale_dali.data.scan import KIND_BAD
from multiscale_dali.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    ShardError,
    load_manifest,
    reader_block,
    samples_per_reader,
)
from multiscale_dali.data.shards import is_packed_dir, loader_rgb, pack_dataset, verify_shards
from multiscale_dali.errors import UserError
from multiscale_dali.pipelines.torchvision_backend import load_rgb
from shard_helpers import SMALL_SHARD_BYTES, read_split, train_only_splits
from conftest import make_jpeg_folder


@pytest.fixture
def dataset(tmp_path: Path) -> DatasetSplits:
    make_jpeg_folder(tmp_path / "images", classes=3, per_class=10, sizes=((40, 32), (36, 44), (48, 48)))
    return discover_dataset(tmp_path / "images", seed=0)


def _pack(splits: DatasetSplits, out: Path, **options) -> object:
    options.setdefault("seed", 7)
    options.setdefault("shard_bytes", SMALL_SHARD_BYTES)
    options.setdefault("workers", 1)
    return pack_dataset(splits=splits, out=out, **options)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_every_sample_is_stored_once_with_its_label_and_the_source_bytes(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    for name in ("train", "val", "test"):
        source = dataset.split(name)
        by_bytes = {Path(f).read_bytes(): label for f, label in zip(source.files, source.labels)}
        packed = read_split(manifest, name)
        assert [s.key for s in packed] == [f"{i:08d}" for i in range(len(source))]
        assert sorted(by_bytes[s.image] for s in packed) == sorted(source.labels)
        assert all(by_bytes[s.image] == s.label == int(np.frombuffer(s.label_raw, "<i8")[0]) for s in packed)
        assert manifest.split(name).samples == len(source)
        assert list(manifest.split(name).class_counts) == source.class_counts(3)


def test_samples_are_stored_in_a_seeded_shuffle_that_the_seed_changes(dataset, tmp_path):
    first = [s.label for s in read_split(_pack(dataset, tmp_path / "a", seed=1), "train")]
    again = [s.label for s in read_split(_pack(dataset, tmp_path / "b", seed=1), "train")]
    other = [s.label for s in read_split(_pack(dataset, tmp_path / "c", seed=2), "train")]
    assert first == again
    assert first != sorted(first)  # discovery lists the train split class by class
    assert first != other


def test_the_same_seed_packs_the_same_bytes(dataset, tmp_path):
    _pack(dataset, tmp_path / "a")
    _pack(dataset, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_shards_stay_under_shard_bytes_and_the_manifest_describes_them(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    shards = manifest.split("train").shards
    assert len(shards) > 2
    for shard in shards:
        path = tmp_path / "pack" / shard.name
        assert shard.bytes == path.stat().st_size <= SMALL_SHARD_BYTES
        assert shard.name.startswith("train-") and (tmp_path / "pack" / shard.index).is_file()
    data = json.loads((tmp_path / "pack" / MANIFEST_FILE).read_text())
    assert data["format_version"] == FORMAT_VERSION and data["msdali_version"] == __version__
    assert data["classes"] == ["class_0", "class_1", "class_2"]
    assert data["scan"]["counts"] == {"bad": 0, "converted": 0, "ok": 30}
    assert load_manifest(tmp_path / "pack") == manifest


def test_a_sample_larger_than_shard_bytes_gets_a_shard_of_its_own(tmp_path):
    splits = train_only_splits(tmp_path / "images")
    manifest = _pack(splits, tmp_path / "pack", shard_bytes=4096)
    shards = manifest.split("train").shards
    assert [s.samples for s in shards] == [1] * len(splits.train)


@pytest.mark.skipif(shutil.which("tar") is None or importlib.util.find_spec("wds2idx") is None,
                    reason="needs DALI's wds2idx script and GNU tar")
def test_index_files_are_what_dalis_wds2idx_writes(dataset, tmp_path):
    import wds2idx

    manifest = _pack(dataset, tmp_path / "pack")
    for tar, index in zip(manifest.shard_paths("train"), manifest.index_paths("train")):
        theirs = tmp_path / (tar.stem + ".theirs.idx")
        with wds2idx.IndexCreator(str(tar), str(theirs), verbose=False) as creator:
            creator.create_index()
        assert theirs.read_text() == index.read_text()


def test_the_converter_sees_the_pixels_of_the_torchvision_loader(tmp_path):
    folder = bad_images.write_zoo(tmp_path)
    for name, expected in bad_images.EXPECTED.items():
        if expected.kind in ("ok", "converted"):
            path = str(folder / name)
            assert np.array_equal(loader_rgb(path), load_rgb(path).permute(1, 2, 0).numpy()), name


def _zoo_splits(root: Path) -> tuple[DatasetSplits, Path]:
    folder = bad_images.write_zoo(root)
    files = sorted(str(folder / name) for name in bad_images.EXPECTED)
    train = SplitFiles(files=tuple(files), labels=tuple(i % 2 for i in range(len(files))))
    empty = SplitFiles(files=(), labels=())
    return DatasetSplits(root=str(root), classes=("a", "b"), train=train, val=empty, test=empty,
                         explicit_splits=True), folder


def test_usable_non_jpeg_or_converted_files_are_reencoded_as_the_loader_sees_them(tmp_path):
    splits, folder = _zoo_splits(tmp_path / "zoo")
    manifest = _pack(splits, tmp_path / "pack", on_bad_file="skip", shard_bytes=1 << 20)
    usable = {n for n, e in bad_images.EXPECTED.items() if e.kind in ("ok", "converted")}
    bad = {n for n, e in bad_images.EXPECTED.items() if e.kind == KIND_BAD}
    assert {Path(f.path).name for f in manifest.scan.skipped} == bad
    stored_as_is = {n for n in usable if bad_images.EXPECTED[n].kind == "ok" and bad_images.EXPECTED[n].fmt == "JPEG"}
    reencoded = {Path(f.path).name: f.key for f in manifest.scan.reencoded}
    assert set(reencoded) == usable - stored_as_is

    packed = {s.key: s for s in read_split(manifest, "train")}
    assert len(packed) == len(usable)
    sources = {Path(f).read_bytes(): Path(f).name for f in splits.train.files}
    assert {sources[s.image] for s in packed.values() if s.image in sources} == stored_as_is
    for name, key in reencoded.items():
        image = packed[key].image
        assert image[:3] == b"\xff\xd8\xff", f"{name} was not re-encoded as JPEG"
        decoded = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")).astype(int)
        expected = load_rgb(str(folder / name)).permute(1, 2, 0).numpy().astype(int)
        assert decoded.shape == expected.shape, name  # EXIF orientation applied before encoding
        assert np.abs(decoded - expected).mean() < 3, name  # JPEG q95 4:4:4 loss only


def test_bad_files_stop_the_pack_before_anything_is_written(tmp_path):
    splits, _ = _zoo_splits(tmp_path / "zoo")
    with pytest.raises(ShardError, match="truncated.jpg") as caught:
        _pack(splits, tmp_path / "pack")
    assert isinstance(caught.value, UserError) and caught.value.flag == "--data"
    assert not (tmp_path / "pack").exists()


def test_a_killed_pack_leaves_no_manifest_and_packing_again_starts_clean(dataset, tmp_path):
    out = tmp_path / "pack"

    def die(stage: str, done: int, total: int) -> None:
        if stage == "pack" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _pack(dataset, out, on_progress=die)
    assert not (out / MANIFEST_FILE).exists() and not is_packed_dir(out)
    assert any(out.iterdir())  # the shards written before the kill are still there
    with pytest.raises(ShardError, match="no manifest.json"):
        load_manifest(out)
    # What a SIGKILL leaves on top: a temporary file of atomic_write and a shard a later pack won't write.
    (out / ".train-000001.tar.k1ll3d_x.tmp").write_bytes(b"partial")
    (out / "train-000999.tar").write_bytes(b"stale")

    manifest = _pack(dataset, out)
    expected = {MANIFEST_FILE} | {x for s in manifest.splits for sh in s.shards for x in (sh.name, sh.index)}
    assert {p.name for p in out.iterdir()} == expected
    verify_shards(load_manifest(out), deep=True)
    _pack(dataset, tmp_path / "fresh")
    assert _files(out) == _files(tmp_path / "fresh")


def test_packing_refuses_a_directory_it_does_not_own(dataset, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ShardError, match="thesis.tex"):
        _pack(dataset, out)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    other = tmp_path / "other-tool"
    other.mkdir()
    (other / MANIFEST_FILE).write_text('{"name": "someone else\'s"}')
    with pytest.raises(ShardError, match="another tool"):
        _pack(dataset, other)
    assert (other / MANIFEST_FILE).read_text() == '{"name": "someone else\'s"}'


def test_a_manifest_from_a_newer_msdali_is_refused_by_name(dataset, tmp_path):
    _pack(dataset, tmp_path / "pack")
    path = tmp_path / "pack" / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(format_version=FORMAT_VERSION + 1, msdali_version="9.9.9")
    path.write_text(json.dumps(data))
    assert is_packed_dir(tmp_path / "pack")
    with pytest.raises(ShardError, match=r"newer msdali 9\.9\.9"):
        load_manifest(path)


def test_a_missing_shard_is_named_when_the_manifest_loads(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    (tmp_path / "pack" / manifest.split("val").shards[0].name).unlink()
    with pytest.raises(ShardError, match=r"val-000000\.tar is missing"):
        load_manifest(tmp_path / "pack")


def test_only_a_directory_with_a_manifest_is_a_packed_dir(dataset, tmp_path):
    assert not is_packed_dir(tmp_path / "images")
    assert not is_packed_dir(tmp_path / "nowhere")
    _pack(dataset, tmp_path / "pack")
    assert is_packed_dir(tmp_path / "pack")


def test_verify_passes_an_intact_pack_at_both_depths(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    for deep in (False, True):
        result = verify_shards(manifest, deep=deep)
        assert result.samples == 30 and result.shards == sum(len(s.shards) for s in manifest.splits)


def _shard_and_index(manifest, number: int) -> tuple[Path, list[list[str]]]:
    """Shard ``number`` of the train split and its index lines split into fields (samples only)."""
    shard = manifest.split("train").shards[number]
    lines = (manifest.directory / shard.index).read_text().splitlines()[1:]
    return manifest.directory / shard.name, [line.split() for line in lines]


def test_a_truncated_shard_is_reported_with_its_name_and_the_last_good_key(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    path, entries = _shard_and_index(manifest, 1)
    first_key = entries[0][3].split(".")[0]
    second_jpeg_offset = int(entries[1][1])
    path.write_bytes(path.read_bytes()[: second_jpeg_offset + 10])
    with pytest.raises(ShardError, match=rf"{path.name} has .* bytes"):
        verify_shards(manifest, deep=False)
    with pytest.raises(ShardError, match=rf"{path.name} .*truncated or corrupt after key {first_key}"):
        verify_shards(manifest, deep=True)


def test_a_flipped_byte_fails_the_checksum_of_its_shard(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    path, entries = _shard_and_index(manifest, 2)
    data = bytearray(path.read_bytes())
    data[int(entries[0][1]) + 100] ^= 0xFF  # inside the first JPEG
    path.write_bytes(bytes(data))
    verify_shards(manifest, deep=False)  # sizes and index still agree: only the deep check reads the bytes
    with pytest.raises(ShardError, match=f"{path.name} fails its checksum"):
        verify_shards(manifest, deep=True)


def test_a_damaged_member_header_is_reported_with_the_shard_and_key(dataset, tmp_path):
    manifest = _pack(dataset, tmp_path / "pack")
    path, entries = _shard_and_index(manifest, 1)
    first_key = entries[0][3].split(".")[0]
    second_sample_header = int(entries[1][1]) - 512
    data = bytearray(path.read_bytes())
    data[second_sample_header : second_sample_header + 8] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{path.name} .*{first_key}"):
        verify_shards(manifest, deep=True)


def test_reader_blocks_split_every_sample_once_in_sizes_one_apart():
    for n, shards in ((10, 3), (33, 4), (7, 7), (100, 8)):
        blocks = [reader_block(n, k, shards) for k in range(shards)]
        assert [p for b in blocks for p in b] == list(range(n))
        assert max(map(len, blocks)) == samples_per_reader(n, shards) and min(map(len, blocks)) >= n // shards


def test_pack_options_are_checked_before_any_work(dataset, tmp_path):
    with pytest.raises(ValueError, match="on_bad_file"):
        _pack(dataset, tmp_path / "pack", on_bad_file="ignore")
    with pytest.raises(ValueError, match="shard_bytes"):
        _pack(dataset, tmp_path / "pack", shard_bytes=100)
    with pytest.raises(ValueError, match="task"):
        _pack(dataset, tmp_path / "pack", task="regression")
    assert not (tmp_path / "pack").exists()
