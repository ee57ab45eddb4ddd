"""Named constants shared by every backend, so no module carries magic numbers."""

from __future__ import annotations

# Channel statistics of ImageNet in the 0-255 range: the pipelines emit uint8 and normalisation
# happens on the training device, so the statistics live in pixel units.
IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# RandomResizedCrop ranges, as in the torchvision references and DALI's ResNet-50 example.
DEFAULT_CROP_AREA: tuple[float, float] = (0.25, 1.0)
DEFAULT_CROP_ASPECT: tuple[float, float] = (3 / 4, 4 / 3)

# Evaluation crops the centre: the image is resized so that its shorter side is
# scale / EVAL_CROP_FRACTION, then a scale x scale centre crop is taken (224 / 256 in ImageNet terms).
EVAL_CROP_FRACTION: float = 0.875

DEFAULT_SCALES: tuple[int, ...] = (64, 96, 128)
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

BACKENDS: tuple[str, ...] = ("auto", "dali", "torchvision")
MODES: tuple[str, ...] = ("multiscale", "progressive")
TASKS: tuple[str, ...] = ("auto", "binary", "multiclass")
CONSISTENCY_TYPES: tuple[str, ...] = ("kl_divergence", "js", "mse")

# Share of JPEG decoding DALI's mixed decoder sends to the hardware JPEG engines (A100/H100 and
# later); the rest runs on the CUDA/CPU hybrid path. The benchmark sweeps it.
DEFAULT_HW_DECODER_LOAD: float = 0.65

# Decompression-bomb cap, checked from image headers before any decode: Pillow's own default.
DEFAULT_MAX_PIXELS: int = 89_478_485

# Consistency targets: the largest scale's prediction, or the mean of every scale's probabilities.
TEACHERS: tuple[str, ...] = ("largest", "mean")

# Files of a run directory (here, not in run_directory.py, so torch-free readers such as plot.py
# can import them).
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"

# Exit code of `msdali train` when it stopped on SIGTERM/SIGINT after saving a checkpoint:
# EX_TEMPFAIL from sysexits.h, "try again later", which is what `--resume auto` then does.
EXIT_INTERRUPTED = 75
