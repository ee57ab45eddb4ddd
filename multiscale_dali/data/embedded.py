"""The embedded default dataset: JPEG crops of real texture photos shipped inside scikit-image.

Classes are ``brick``, ``grass`` and ``gravel`` (512x512 grayscale photos in ``skimage/data``); the
binary variant keeps brick and gravel. Each photo is cut into three disjoint horizontal bands
(``BAND_FRACTIONS``: train on top, then val, then test) and every crop lies entirely inside the
band of its split, so no pixel is shared between train, val and test. Crops have a random side
(``CROP_SIDE_RANGE``, i.e. the texture is seen at varied scales once resized) with a small aspect
jitter, at random positions in their band, and are saved at their native size as JPEG.

Nothing is downloaded: the PNG files are read straight from the installed scikit-image package
(``skimage.data.download_all`` and the pooch-backed fetchers are never called).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from multiscale_dali.constants import SPLIT_NAMES

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "TEXTURE_CLASSES",
    "BINARY_TEXTURE_CLASSES",
    "BAND_FRACTIONS",
    "DEFAULT_PER_CLASS",
    "MARKER_NAME",
    "Box",
    "texture_classes",
    "split_bands",
    "plan_crops",
    "default_cache_dir",
    "materialize_textures",
    "default_dataset",
]

logger = logging.getLogger(__name__)

TEXTURE_CLASSES: tuple[str, ...] = ("brick", "grass", "gravel")
# Brick vs gravel: regular vs irregular structure, the pair that stays distinguishable at every
# crop scale (grass and gravel are both fine-grained and closer to each other).
BINARY_TEXTURE_CLASSES: tuple[str, ...] = ("brick", "gravel")

# Row ranges of each split as fractions of the photo height: [start, end). Consecutive bands share
# only their boundary, which is exclusive for the upper band, so the bands are disjoint.
BAND_FRACTIONS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.6),
    "val": (0.6, 0.8),
    "test": (0.8, 1.0),
}
# Side of a crop before aspect jitter, in pixels, inclusive. 100 fits in the 102- and 103-row test
# and val bands of a 512-row photo; 48 is small enough that a crop shows a clearly different scale than a 100 px one.
CROP_SIDE_RANGE: tuple[int, int] = (48, 100)
# Height / width of a crop is drawn log-uniformly from [1 / MAX_ASPECT_JITTER, MAX_ASPECT_JITTER].
MAX_ASPECT_JITTER: float = 1.2
JPEG_QUALITY: int = 90
DEFAULT_PER_CLASS: tuple[int, int, int] = (160, 32, 32)
DEFAULT_SEED: int = 0
# Bump when anything that changes the generated files changes (crops, quality, classes, ...): the
# cache directory name carries it, so stale caches are never re-used.
DATASET_VERSION: int = 1
# Written last into a materialized dataset; its presence means the dataset is complete. Hidden, so
# dataset discovery never mistakes it for data.
MARKER_NAME: str = ".msdali-complete.json"
CACHE_ENV_VAR: str = "MSDALI_CACHE"
DEFAULT_CACHE_DIR: Path = Path("~/.cache/msdali")

# (left, top, right, bottom) in pixels, right/bottom exclusive: the convention of PIL's Image.crop.
Box = tuple[int, int, int, int]

_INSTALL_HINT = "the embedded sample dataset needs scikit-image: pip install scikit-image"


def texture_classes(*, binary: bool = False) -> tuple[str, ...]:
    """The class names of the texture set (sorted, so they match the discovered label order)."""
    return tuple(sorted(BINARY_TEXTURE_CLASSES if binary else TEXTURE_CLASSES))


def split_bands(height: int) -> dict[str, tuple[int, int]]:
    """Row range ``[start, end)`` of each split for a photo ``height`` rows tall.

    Every boundary is computed once and shared by the two bands it separates, so the bands tile
    ``[0, height)`` without overlap whatever the rounding.
    """
    bands: dict[str, tuple[int, int]] = {}
    for name in SPLIT_NAMES:
        start, end = BAND_FRACTIONS[name]
        bands[name] = (round(start * height), round(end * height))
        if bands[name][0] >= bands[name][1]:
            raise ValueError(f"a photo {height} rows tall is too short: its {name} band would be empty")
    return bands


def plan_crops(
    image_size: tuple[int, int],
    per_class: tuple[int, int, int],
    *,
    seed: int,
    class_name: str,
) -> dict[str, list[Box]]:
    """Crop boxes of each split for one photo of ``image_size`` = (width, height). Pure function.

    Each (class, split) pair draws from its own generator seeded with
    ``[seed, crc32(class_name), split index]``: changing the val count does not move the train
    crops, and the brick crops are the same in the binary and the three-class variants.
    """
    width, height = image_size
    counts = _validate_per_class(per_class)
    bands = split_bands(height)
    class_key = zlib.crc32(class_name.encode("utf-8"))
    boxes: dict[str, list[Box]] = {}
    for split_index, (name, count) in enumerate(zip(SPLIT_NAMES, counts)):
        top, bottom = bands[name]
        band_height = bottom - top
        max_side = min(CROP_SIDE_RANGE[1], band_height, width)
        min_side = min(CROP_SIDE_RANGE[0], max_side)
        if max_side < 1:
            raise ValueError(f"cannot crop a {width}x{height} image: it has no columns")
        rng = np.random.default_rng([seed, class_key, split_index])
        split_boxes: list[Box] = []
        for _ in range(count):
            side = int(rng.integers(min_side, max_side, endpoint=True))
            aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT_JITTER), math.log(MAX_ASPECT_JITTER)))
            crop_w = min(width, max(1, round(side / math.sqrt(aspect))))
            crop_h = min(band_height, max(1, round(side * math.sqrt(aspect))))
            left = int(rng.integers(0, width - crop_w, endpoint=True))
            y0 = top + int(rng.integers(0, band_height - crop_h, endpoint=True))
            split_boxes.append((left, y0, left + crop_w, y0 + crop_h))
        boxes[name] = split_boxes
    return boxes


def default_cache_dir() -> Path:
    """``$MSDALI_CACHE`` when set (and not empty), else ``~/.cache/msdali``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR.expanduser()


def materialize_textures(
    dest: Path,
    *,
    binary: bool = False,
    per_class: tuple[int, int, int] = DEFAULT_PER_CLASS,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Write the texture crops to ``dest/{train,val,test}/<class>/<class>_<split>_<i:04d>.jpg``.

    ``per_class`` is the number of (train, val, test) crops per class. ``dest`` must not exist or be
    empty. Crops are grayscale content stored as 3-channel RGB JPEG: the trainer's real inputs
    are colour JPEGs, and storing RGB makes the sample set take the same full-colour decode path
    in DALI and torchvision (a 1-channel JPEG decodes faster and would flatter the benchmark).
    Writes no completion marker: :func:`default_dataset` does that once everything is in place.
    Returns ``dest``.
    """
    counts = _validate_per_class(per_class)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not an empty directory")
    classes = texture_classes(binary=binary)
    data_dir = _skimage_data_dir()
    logger.info(
        "materializing %s texture dataset (%s; %d/%d/%d train/val/test crops per class, seed %d) into %s",
        _variant(binary), ", ".join(classes), *counts, seed, dest,
    )
    for class_name in classes:
        photo = _load_photo(data_dir, class_name)
        boxes = plan_crops(photo.size, counts, seed=seed, class_name=class_name)
        for split_name, split_boxes in boxes.items():
            out_dir = dest / split_name / class_name
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, box in enumerate(split_boxes):
                crop = photo.crop(box).convert("RGB")
                crop.save(out_dir / f"{class_name}_{split_name}_{i:04d}.jpg", "JPEG", quality=JPEG_QUALITY)
    return dest


def default_dataset(*, binary: bool = False, cache_dir: Path | None = None) -> Path:
    """Path of the default texture dataset, materialized into the cache on first use.

    Lives in ``<cache>/textures-<variant>-v<DATASET_VERSION>-seed<DEFAULT_SEED>/`` and is re-used
    whenever its completion marker is present with the expected parameters. It is built in a
    temporary sibling folder and renamed into place only once complete, so an interrupted or
    concurrent build is never mistaken for a finished one; when two processes race, the first
    rename wins and the other discards its copy.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"textures-{_variant(binary)}-v{DATASET_VERSION}-seed{DEFAULT_SEED}"

    def build(tmp: Path) -> None:
        logger.info("texture dataset not in the cache yet: building %s", final)
        started = time.perf_counter()
        materialize_textures(tmp, binary=binary, per_class=DEFAULT_PER_CLASS, seed=DEFAULT_SEED)
        logger.info("texture dataset built in %.1fs", time.perf_counter() - started)

    return build_cached(final, _marker_params(binary=binary, per_class=DEFAULT_PER_CLASS, seed=DEFAULT_SEED),
                        build, marker=MARKER_NAME)


def build_cached(final: Path, params: dict[str, Any], build: Callable[[Path], None], *, marker: str) -> Path:
    """``final``, made by ``build(folder)`` on first use and re-used while its ``marker`` file holds ``params``.

    Built in a temporary sibling and renamed into place only once complete (the marker goes in
    last: its presence vouches for every file written before it), so an interrupted or concurrent
    build is never mistaken for a finished one; when two processes race, the first rename wins.
    """
    if _is_complete(final, params, marker=marker):
        logger.debug("using cached %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / marker).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, final, params, marker=marker)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _move_into_place(tmp: Path, final: Path, expected: dict[str, Any], *, marker: str) -> None:
    """Rename the complete ``tmp`` to ``final``, clearing an incomplete leftover at ``final``."""
    for _attempt in range(2):
        try:
            os.replace(tmp, final)  # atomic; fails if ``final`` is a non-empty directory
            return
        except OSError:
            if _is_complete(final, expected, marker=marker):
                logger.info("another process finished %s first; using its copy", final)
                return
            if not final.exists():
                raise
            # Not ours and not complete (an interrupted build from an older version, a hand-made
            # folder, a marker with other parameters): move it aside first so that no reader ever
            # sees a half-deleted folder, then delete it.
            logger.warning("replacing incomplete or outdated dataset folder %s", final)
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            try:
                os.replace(final, trash / final.name)
            except FileNotFoundError:
                pass  # someone else moved it away meanwhile: just retry the rename
            shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)


def _is_complete(folder: Path, expected: dict[str, Any], *, marker: str) -> bool:
    try:
        found = json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return False
    if found != expected:
        logger.warning("marker %s has parameters %s, expected %s", folder / marker, found, expected)
        return False
    return True


def _marker_params(*, binary: bool, per_class: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """What a cached dataset must have been built with to be re-used (plain JSON types)."""
    return {
        "dataset": "textures",
        "version": DATASET_VERSION,
        "variant": _variant(binary),
        "classes": list(texture_classes(binary=binary)),
        "per_class": list(per_class),
        "seed": seed,
        "band_fractions": {name: list(BAND_FRACTIONS[name]) for name in SPLIT_NAMES},
        "crop_side_range": list(CROP_SIDE_RANGE),
        "max_aspect_jitter": MAX_ASPECT_JITTER,
        "jpeg_quality": JPEG_QUALITY,
    }


def _variant(binary: bool) -> str:
    return "binary" if binary else "multiclass"


def _validate_per_class(per_class: tuple[int, int, int]) -> tuple[int, int, int]:
    values = tuple(per_class)
    # Every split needs at least one crop per class: an empty class folder is a dataset error.
    if len(values) != len(SPLIT_NAMES) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values
    ):
        raise ValueError(f"per_class must be three integers >= 1 (train, val, test), got {per_class!r}")
    return (values[0], values[1], values[2])


def _skimage_data_dir() -> Path:
    """The ``data`` folder inside the installed scikit-image package (nothing is fetched)."""
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Path(skimage.data.__file__).parent


def _load_photo(data_dir: Path, class_name: str) -> Image.Image:
    """The texture photo of ``class_name`` as a PIL grayscale image, read from ``data_dir``."""
    # Imported here: Pillow comes with scikit-image, which is checked for first with a clear hint.
    from PIL import Image

    path = data_dir / f"{class_name}.png"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed scikit-image; reinstall it: "
            "pip install --force-reinstall scikit-image"
        )
    with Image.open(path) as img:
        return img.convert("L")
