"""Synthetic ImageNet-like JPEGs for benchmarks: deterministic, photo-like in size and entropy.

A flat colour JPEG decodes several times faster than a photo of the same size (almost every DCT
block is empty), so a loader benchmark on flat images would flatter every backend. Each image here
is a sum of smooth random fields at several spatial frequencies (broad shapes and mid-size detail,
like a photo's 1/f spectrum) plus per-pixel noise (sensor grain, which keeps the high-frequency DCT
coefficients busy). At 500x375 and quality 90 the files come out at about 60 KB: the same order as
an average ImageNet training JPEG (~110 KB; real photos have more edges), tens of times a flat one.

The folder is an ImageFolder without splits: ``dest/class_<k>/synthetic_<i>.jpg``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from multiscale_dali.data.embedded import build_cached, default_cache_dir

__all__ = [
    "DEFAULT_SYNTHETIC_SIZE",
    "DEFAULT_SYNTHETIC_QUALITY",
    "synthetic_photo",
    "write_synthetic_jpegs",
    "cached_synthetic_jpegs",
]

log = logging.getLogger(__name__)

# (width, height) of ImageNet's most common training image shape.
DEFAULT_SYNTHETIC_SIZE: tuple[int, int] = (500, 375)
DEFAULT_SYNTHETIC_QUALITY: int = 90
# Random-field grid sizes (cells along the longer side) and their amplitudes in pixel units: coarse
# fields carry most of the energy, finer ones less, roughly like the spectrum of natural images.
OCTAVE_CELLS: tuple[int, ...] = (3, 6, 12, 24, 48, 96)
OCTAVE_AMPLITUDES: tuple[float, ...] = (70.0, 45.0, 30.0, 22.0, 16.0, 12.0)
# Standard deviation of the per-pixel noise, in pixel units (8-bit scale).
GRAIN_SIGMA: float = 8.0
# How far each class's mean colour is pushed from mid-grey, so classes are not identical.
CLASS_TINT: float = 25.0
MID_GREY: float = 127.5
CHANNELS = 3
# Bump when the generated pixels change: cached folders carry it in their name.
SYNTHETIC_VERSION = 1
MARKER_NAME = ".msdali-synthetic-complete.json"


def _smooth_field(rng: np.random.Generator, *, cells: int, size: tuple[int, int]) -> np.ndarray:
    """One random field of ``cells`` cells along the longer side, bicubically upsampled to ``size``."""
    width, height = size
    longer = max(width, height)
    grid_w = max(2, round(cells * width / longer))
    grid_h = max(2, round(cells * height / longer))
    channels = []
    for values in rng.standard_normal((CHANNELS, grid_h, grid_w)).astype(np.float32):
        # Mode "F" keeps the float field un-quantised through the resize.
        channels.append(np.asarray(Image.fromarray(values, mode="F").resize(size, Image.BICUBIC)))
    return np.stack(channels, axis=-1)


def synthetic_photo(*, size: tuple[int, int], seed: int, index: int, label: int, classes: int) -> np.ndarray:
    """The uint8 HWC RGB pixels of image ``index``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    width, height = size
    image = np.full((height, width, CHANNELS), MID_GREY, dtype=np.float32)
    for cells, amplitude in zip(OCTAVE_CELLS, OCTAVE_AMPLITUDES):
        field = _smooth_field(rng, cells=cells, size=size)
        # Mix a shared luminance component into the channels: photo colours are correlated, and
        # independent channels would look (and compress) like chroma noise.
        luminance = field.mean(axis=-1, keepdims=True)
        image += amplitude * (0.7 * luminance + 0.3 * field)
    hue = 2 * np.pi * label / max(classes, 1)
    image += CLASS_TINT * np.array([np.cos(hue), np.cos(hue + 2.1), np.cos(hue + 4.2)], dtype=np.float32)
    image += rng.normal(0.0, GRAIN_SIGMA, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _check_args(count: int, size: tuple[int, int], quality: int, classes: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if len(size) != 2 or any(int(v) < 1 for v in size):
        raise ValueError(f"size must be (width, height) with positive sides, got {size!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if classes < 1 or classes > count:
        raise ValueError(f"classes must be in 1..count ({count}), got {classes}")


def write_synthetic_jpegs(
    dest: Path,
    *,
    count: int,
    size: tuple[int, int] = DEFAULT_SYNTHETIC_SIZE,
    quality: int = DEFAULT_SYNTHETIC_QUALITY,
    classes: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``count`` JPEGs of ``size`` = (width, height) to ``dest/class_<k>/``; return ``dest``.

    Images go round-robin to the ``classes`` folders, so every class gets ``count // classes`` or one
    more. The same arguments always give the same pixels (files may differ only if libjpeg does).
    """
    _check_args(count, size, quality, classes)
    dest = Path(dest)
    size = (int(size[0]), int(size[1]))
    for index in range(count):
        label = index % classes
        folder = dest / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = synthetic_photo(size=size, seed=seed, index=index, label=label, classes=classes)
        Image.fromarray(pixels).save(folder / f"synthetic_{index:05d}.jpg", "JPEG", quality=quality)
    log.info("wrote %d synthetic %dx%d JPEGs (q%d, %d classes, seed %d) to %s",
             count, size[0], size[1], quality, classes, seed, dest)
    return dest


def cached_synthetic_jpegs(
    *,
    count: int,
    size: tuple[int, int] = DEFAULT_SYNTHETIC_SIZE,
    quality: int = DEFAULT_SYNTHETIC_QUALITY,
    classes: int = 2,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> Path:
    """:func:`write_synthetic_jpegs` into the msdali cache, re-used while its marker matches.

    Built in a temporary sibling and renamed into place once complete, so an interrupted build is
    never mistaken for a finished one.
    """
    _check_args(count, size, quality, classes)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    params: dict[str, Any] = {"version": SYNTHETIC_VERSION, "count": count, "size": list(size),
                              "quality": quality, "classes": classes, "seed": seed}
    final = cache / f"synthetic-v{SYNTHETIC_VERSION}-n{count}-{size[0]}x{size[1]}-q{quality}-c{classes}-seed{seed}"
    return build_cached(
        final, params,
        lambda tmp: write_synthetic_jpegs(tmp, count=count, size=size, quality=quality, classes=classes, seed=seed),
        marker=MARKER_NAME,
    )
