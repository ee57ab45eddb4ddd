"""The embedded texture dataset: layout, real content, disjoint bands, determinism and caching."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multiscale_dali.data import embedded as sample_data
from multiscale_dali.constants import SPLIT_NAMES
from multiscale_dali.data.discovery import discover_dataset
from multiscale_dali.data.embedded import (
    CROP_SIDE_RANGE,
    MARKER_NAME,
    default_cache_dir,
    default_dataset,
    materialize_textures,
    plan_crops,
    split_bands,
    texture_classes,
)

pytest.importorskip("skimage")

SMALL = (4, 2, 2)  # crops per class for train / val / test: enough to check, fast to write
PHOTO_SIZE = (512, 512)
# Below this standard deviation (0-255 scale) a crop would be essentially flat, not a texture.
MIN_TEXTURE_STD = 5.0
# Mean absolute difference allowed between a JPEG (quality 90) crop and its source pixels.
MAX_JPEG_MEAN_ABS_ERROR = 4.0


@pytest.fixture
def small_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A cache folder, with the default crop counts shrunk so that default_dataset stays fast."""
    monkeypatch.setattr(sample_data, "DEFAULT_PER_CLASS", SMALL)
    return tmp_path / "cache"


def _jpegs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


# --- layout and content ---------------------------------------------------------------------------


def test_materialize_writes_the_split_class_layout_with_requested_counts(tmp_path: Path) -> None:
    dest = materialize_textures(tmp_path / "tex", per_class=SMALL, seed=0)

    assert dest == tmp_path / "tex"
    for split, count in zip(SPLIT_NAMES, SMALL):
        for cls in ("brick", "grass", "gravel"):
            names = sorted(p.name for p in (dest / split / cls).iterdir())
            assert names == [f"{cls}_{split}_{i:04d}.jpg" for i in range(count)]
    assert len(_jpegs(dest)) == 3 * sum(SMALL)


def test_materialized_set_is_discovered_as_explicit_splits(tmp_path: Path) -> None:
    dest = materialize_textures(tmp_path / "tex", per_class=SMALL)

    splits = discover_dataset(dest)

    assert splits.explicit_splits is True
    assert splits.classes == ("brick", "grass", "gravel") == texture_classes()
    assert splits.train.class_counts(3) == [SMALL[0]] * 3
    assert splits.val.class_counts(3) == [SMALL[1]] * 3
    assert splits.test.class_counts(3) == [SMALL[2]] * 3


def test_binary_variant_has_brick_and_gravel(tmp_path: Path) -> None:
    dest = materialize_textures(tmp_path / "tex", binary=True, per_class=SMALL)

    assert sorted(p.name for p in (dest / "train").iterdir()) == ["brick", "gravel"]
    assert texture_classes(binary=True) == ("brick", "gravel")
    assert len(_jpegs(dest)) == 2 * sum(SMALL)


def test_crops_are_real_rgb_photo_content_at_varied_sizes(tmp_path: Path) -> None:
    dest = materialize_textures(tmp_path / "tex", per_class=SMALL)

    sizes = set()
    for path in _jpegs(dest):
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            pixels = np.asarray(img, dtype=np.float32)
        assert pixels.std() > MIN_TEXTURE_STD, f"{path} is nearly constant"
        # Grayscale content stored as RGB: the three channels carry the same picture.
        assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 2
        sizes.add(pixels.shape[:2])
    assert len(sizes) > 1


def test_crops_match_the_photo_pixels_inside_their_planned_box(tmp_path: Path) -> None:
    dest = materialize_textures(tmp_path / "tex", per_class=SMALL, seed=4)
    photo = np.asarray(sample_data._load_photo(sample_data._skimage_data_dir(), "gravel"), np.float32)
    boxes = plan_crops((photo.shape[1], photo.shape[0]), SMALL, seed=4, class_name="gravel")

    for split in SPLIT_NAMES:
        for i, (left, top, right, bottom) in enumerate(boxes[split]):
            with Image.open(dest / split / "gravel" / f"gravel_{split}_{i:04d}.jpg") as img:
                crop = np.asarray(img.convert("L"), np.float32)
            expected = photo[top:bottom, left:right]
            assert crop.shape == expected.shape
            assert np.abs(crop - expected).mean() < MAX_JPEG_MEAN_ABS_ERROR


def test_classes_are_different_photos(tmp_path: Path) -> None:
    data_dir = sample_data._skimage_data_dir()
    photos = [np.asarray(sample_data._load_photo(data_dir, c)) for c in texture_classes()]

    for a, b in itertools.combinations(photos, 2):
        assert a.shape == b.shape == PHOTO_SIZE
        assert not np.array_equal(a, b)


# --- disjoint bands -------------------------------------------------------------------------------


@pytest.mark.parametrize("height", [4, 10, 101, 512, 1000])
def test_split_bands_tile_the_height_without_overlap(height: int) -> None:
    bands = split_bands(height)

    assert bands["train"][0] == 0
    assert bands["train"][1] == bands["val"][0]
    assert bands["val"][1] == bands["test"][0]
    assert bands["test"][1] == height
    assert all(start < end for start, end in bands.values())


def test_split_bands_reject_a_photo_too_short_for_three_bands() -> None:
    with pytest.raises(ValueError, match="3 rows"):
        split_bands(3)


def test_split_bands_for_the_texture_photos() -> None:
    assert split_bands(512) == {"train": (0, 307), "val": (307, 410), "test": (410, 512)}


def test_crop_boxes_of_different_splits_never_share_a_pixel() -> None:
    per_class = (60, 30, 30)
    bands = split_bands(PHOTO_SIZE[1])
    for cls in texture_classes():
        boxes = plan_crops(PHOTO_SIZE, per_class, seed=11, class_name=cls)
        for split, split_boxes in boxes.items():
            top, bottom = bands[split]
            for left, y0, right, y1 in split_boxes:
                assert top <= y0 < y1 <= bottom
                assert 0 <= left < right <= PHOTO_SIZE[0]
        for a, b in itertools.combinations(SPLIT_NAMES, 2):
            for (_, a0, _, a1), (_, b0, _, b1) in itertools.product(boxes[a], boxes[b]):
                assert a1 <= b0 or b1 <= a0, f"{cls}: {a} rows {a0}..{a1} overlap {b} rows {b0}..{b1}"


def test_crop_sides_vary_within_the_configured_range() -> None:
    boxes = plan_crops(PHOTO_SIZE, (200, 50, 50), seed=0, class_name="brick")
    sides = [max(r - l, b - t) for split in boxes.values() for (l, t, r, b) in split]
    shortest = [min(r - l, b - t) for split in boxes.values() for (l, t, r, b) in split]

    # Aspect jitter may push one side a little past the nominal range.
    assert min(shortest) >= CROP_SIDE_RANGE[0] * 0.9
    assert max(sides) <= CROP_SIDE_RANGE[1] * 1.1
    assert max(sides) - min(shortest) > (CROP_SIDE_RANGE[1] - CROP_SIDE_RANGE[0]) / 2


def test_plan_crops_is_deterministic_and_seed_dependent() -> None:
    first = plan_crops(PHOTO_SIZE, SMALL, seed=1, class_name="grass")
    assert first == plan_crops(PHOTO_SIZE, SMALL, seed=1, class_name="grass")
    assert first != plan_crops(PHOTO_SIZE, SMALL, seed=2, class_name="grass")
    assert first != plan_crops(PHOTO_SIZE, SMALL, seed=1, class_name="brick")


def test_train_crops_do_not_move_when_val_count_changes() -> None:
    a = plan_crops(PHOTO_SIZE, (5, 2, 2), seed=0, class_name="brick")
    b = plan_crops(PHOTO_SIZE, (5, 9, 2), seed=0, class_name="brick")
    assert a["train"] == b["train"] and a["test"] == b["test"]


# --- determinism of the written files ------------------------------------------------------------


def test_materialize_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    a = materialize_textures(tmp_path / "a", binary=True, per_class=SMALL, seed=3)
    b = materialize_textures(tmp_path / "b", binary=True, per_class=SMALL, seed=3)
    c = materialize_textures(tmp_path / "c", binary=True, per_class=SMALL, seed=4)

    def contents(root: Path) -> list[tuple[str, bytes]]:
        return [(str(p.relative_to(root)), p.read_bytes()) for p in _jpegs(root)]

    assert contents(a) == contents(b)
    assert contents(a) != contents(c)


# --- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("per_class", [(4, 0, 2), (4, 2), (4.0, 2, 2), (-1, 2, 2)])
def test_bad_per_class_is_rejected_naming_it(tmp_path: Path, per_class: tuple) -> None:
    with pytest.raises(ValueError, match="per_class") as info:
        materialize_textures(tmp_path / "tex", per_class=per_class)  # type: ignore[arg-type]
    assert repr(per_class) in str(info.value)


def test_materialize_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "tex").mkdir()
    (tmp_path / "tex" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path / "tex")):
        materialize_textures(tmp_path / "tex", per_class=SMALL)


def test_missing_scikit_image_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        materialize_textures(tmp_path / "tex", per_class=SMALL)


# --- cache ------------------------------------------------------------------------------------------


def test_default_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MSDALI_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MSDALI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "msdali"


def test_default_dataset_uses_the_environment_cache(
    monkeypatch: pytest.MonkeyPatch, small_cache: Path
) -> None:
    monkeypatch.setenv("MSDALI_CACHE", str(small_cache))
    assert default_dataset(binary=True) == small_cache / "textures-binary-v1-seed0"


def test_default_dataset_materializes_once_and_reuses_the_marked_folder(
    small_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="multiscale_dali.data.embedded"):
        first = default_dataset(cache_dir=small_cache)
    assert first == small_cache / "textures-multiclass-v1-seed0"
    assert str(first) in caplog.text  # says where it materializes
    marker = json.loads((first / MARKER_NAME).read_text())
    assert marker["variant"] == "multiclass" and marker["per_class"] == list(SMALL) and marker["seed"] == 0
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    second = default_dataset(cache_dir=small_cache)

    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == mtimes
    # Only the finished folder is left in the cache: no temporary build folders.
    assert sorted(p.name for p in small_cache.iterdir()) == [first.name]


def test_variants_live_in_separate_folders(small_cache: Path) -> None:
    multi = default_dataset(cache_dir=small_cache)
    binary = default_dataset(binary=True, cache_dir=small_cache)

    assert multi != binary
    assert discover_dataset(binary).classes == ("brick", "gravel")


def test_folder_without_marker_is_rebuilt_not_reused(small_cache: Path) -> None:
    partial = small_cache / "textures-multiclass-v1-seed0"
    (partial / "train" / "brick").mkdir(parents=True)
    (partial / "train" / "brick" / "brick_train_0000.jpg").write_bytes(b"truncated")

    path = default_dataset(cache_dir=small_cache)

    assert path == partial
    assert (path / MARKER_NAME).is_file()
    assert len(_jpegs(path)) == 3 * sum(SMALL)
    with Image.open(path / "train" / "brick" / "brick_train_0000.jpg") as img:
        img.load()  # the truncated file was replaced by a real JPEG


def test_marker_with_other_parameters_is_rebuilt(small_cache: Path) -> None:
    path = default_dataset(cache_dir=small_cache)
    marker = path / MARKER_NAME
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "per_class": [1, 1, 1]}))

    default_dataset(cache_dir=small_cache)

    assert json.loads(marker.read_text())["per_class"] == list(SMALL)


def test_failed_materialization_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, small_cache: Path
) -> None:
    def explode(dest: Path, **kwargs: object) -> Path:
        (Path(dest) / "train").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(sample_data, "materialize_textures", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        default_dataset(cache_dir=small_cache)

    assert list(small_cache.iterdir()) == []


def test_concurrent_build_that_finished_first_wins(monkeypatch: pytest.MonkeyPatch, small_cache: Path) -> None:
    """Simulate another process completing the dataset while this one is still building."""
    real_materialize = sample_data.materialize_textures
    final = small_cache / "textures-multiclass-v1-seed0"

    winner_mtimes: dict[Path, int] = {}

    def racing(dest: Path, **kwargs: object) -> Path:
        monkeypatch.setattr(sample_data, "materialize_textures", real_materialize)
        assert default_dataset(cache_dir=small_cache) == final  # "the other process" finishes first
        winner_mtimes.update({p: p.stat().st_mtime_ns for p in final.rglob("*")})
        return real_materialize(dest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sample_data, "materialize_textures", racing)

    path = default_dataset(cache_dir=small_cache)

    assert path == final
    # The winner's complete copy is kept untouched and the loser's build folder is cleaned up.
    assert winner_mtimes and {p: p.stat().st_mtime_ns for p in final.rglob("*")} == winner_mtimes
    assert sorted(p.name for p in small_cache.iterdir()) == [final.name]
