"""Real handwritten digits from scikit-learn's bundled copy of the UCI optical digits set.

scikit-learn ships 1,797 digits (8x8, 17 grey levels, written by 43 people) inside its package
(``sklearn/datasets/data/digits.csv.gz``), so nothing is downloaded. They serve as data nobody tuned
this project for: ``docs/results.md`` reports on them beside the texture photos. Each digit is
upsampled to ``SIDE`` px (bicubic, the way a camera's optics would blur it, not nearest-neighbour
blocks) and stored as an RGB JPEG in ``train/val/test/<digit>/``, split by a seeded stratified
permutation. scikit-learn is an optional dependency (the ``results`` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from multiscale_dali.constants import SPLIT_NAMES
from multiscale_dali.data.embedded import build_cached, default_cache_dir
from multiscale_dali.extras import MissingExtraError

logger = logging.getLogger(__name__)

SIDE: int = 32
SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
JPEG_QUALITY: int = 95
DIGITS_VERSION: int = 1
MARKER_NAME: str = ".msdali-digits-complete.json"


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtraError(feature="the digits dataset", extra="results", cause=err) from None
    bunch = load_digits()  # read from the installed package's data folder
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_indices(labels: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split of ``labels`` into train/val/test index arrays (disjoint, complete)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(len(members) * SPLIT_FRACTIONS[0])
        n_val = round(len(members) * SPLIT_FRACTIONS[1])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(members))}
        for name, (lo, hi) in bounds.items():
            parts[name].extend(int(i) for i in members[lo:hi])
    return {name: np.array(sorted(idx), dtype=np.int64) for name, idx in parts.items()}


def materialize_digits(dest: Path, *, seed: int) -> Path:
    """Write the digits as ``dest/<split>/<digit>/digit_<index>.jpg``."""
    from PIL import Image

    images, labels = _load_digits()
    for split, indices in split_indices(labels, seed=seed).items():
        for i in indices:
            # 0..16 grey levels, ink bright on dark: keep the polarity, stretch to 0..255.
            grey = Image.fromarray(np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
            folder = dest / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            big = grey.resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB")
            big.save(folder / f"digit_{i:04d}.jpg", "JPEG", quality=JPEG_QUALITY)
    return dest


def digits_dataset(*, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Path of the digits dataset, materialised into the cache on first use and re-used after."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"digits-{SIDE}px-v{DIGITS_VERSION}-seed{seed}"
    params = {"version": DIGITS_VERSION, "side": SIDE, "seed": seed, "fractions": list(SPLIT_FRACTIONS)}
    return build_cached(final, params, lambda tmp: materialize_digits(tmp, seed=seed), marker=MARKER_NAME)
