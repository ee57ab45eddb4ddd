"""Named constants shared by every backend, so no module carries magic numbers."""

from __future__ import annotations

import enum

# Channel statistics of ImageNet in the 0-255 range: the pipelines emit uint8 and normalisation
# happens on the training device, so the statistics live in pixel units.
IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# RandomResizedCrop ranges, as in the torchvision references and DALI's ResNet-50 example.
DEFAULT_CROP_AREA: tuple[float, float] = (0.25, 1.0)
DEFAULT_CROP_ASPECT: tuple[float, float] = (3 / 4, 4 / 3)

# Evaluation crops first, then resizes: the centre square of side EVAL_CROP_FRACTION x the shorter
# side (floored, see pipelines.sampling.eval_crop_box) is cut out of the full image and resized to
# each scale. The same region as ImageNet's "resize to 256, centre-crop 224" (224 / 256 = 0.875).
EVAL_CROP_FRACTION: float = 0.875

DEFAULT_SCALES: tuple[int, ...] = (64, 96, 128)
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# The choices of the configuration, each defined once. Members are str, so they compare equal to
# the strings of a recipe or a config.json; BACKENDS, MODES, ... below list their plain-string values.
class Backend(enum.StrEnum):
    AUTO = "auto"
    DALI = "dali"
    TORCHVISION = "torchvision"


class Mode(enum.StrEnum):
    MULTISCALE = "multiscale"  # every scale every step
    PROGRESSIVE = "progressive"  # one scale per epoch, growing with the schedule


class Task(enum.StrEnum):
    AUTO = "auto"  # binary for two classes, multiclass otherwise
    BINARY = "binary"  # one logit, BCE
    MULTICLASS = "multiclass"  # one logit per class, CE


class ConsistencyType(enum.StrEnum):
    KL_DIVERGENCE = "kl_divergence"
    JS = "js"
    MSE = "mse"


class Teacher(enum.StrEnum):
    """Consistency targets: the largest scale's prediction, or the mean of every scale's probabilities."""

    LARGEST = "largest"
    MEAN = "mean"


class ScaleWeighting(enum.StrEnum):
    """Each scale's share of the base loss of a multi-scale step."""

    EQUAL = "equal"  # 1/S each
    AREA = "area"  # in proportion to the pixels of a sample at that scale (scale squared)


class ScaleNorm(enum.StrEnum):
    """BatchNorm across the scales of a multi-scale run: one set for all, or one per trained scale."""

    SHARED = "shared"
    PRIVATE = "private"


class Tta(enum.StrEnum):
    """Test-time augmentation of evaluate/predict: none, or the mean over the image and its mirror."""

    NONE = "none"
    FLIP = "flip"


class AutoAugmentPolicy(enum.StrEnum):
    """Automatic augmentation of the training crop, one draw per sample shared by every scale."""

    NONE = "none"
    TRIVIAL = "trivial"  # TrivialAugmentWide
    RAND = "rand"  # RandAugment (--rand-n operations of magnitude --rand-m)
    AUTO = "auto"  # AutoAugment, ImageNet policy


class SelectOn(enum.StrEnum):
    """Which weights a run with a weight EMA keeps as ``best.pt``: the average or the trained ones."""

    EMA = "ema"
    RAW = "raw"


# Plain strings, not the members: click.Choice (8.2+) matches an Enum member by its *name* ("DALI",
# so `--backend dali` would be refused), and torch.load(weights_only=True) refuses enum objects, so
# what reaches flags, configs and checkpoints is the value.
BACKENDS: tuple[str, ...] = tuple(member.value for member in Backend)
MODES: tuple[str, ...] = tuple(member.value for member in Mode)
TASKS: tuple[str, ...] = tuple(member.value for member in Task)
CONSISTENCY_TYPES: tuple[str, ...] = tuple(member.value for member in ConsistencyType)
TEACHERS: tuple[str, ...] = tuple(member.value for member in Teacher)
SCALE_WEIGHTINGS: tuple[str, ...] = tuple(member.value for member in ScaleWeighting)
SCALE_NORMS: tuple[str, ...] = tuple(member.value for member in ScaleNorm)
TTA_CHOICES: tuple[str, ...] = tuple(member.value for member in Tta)
AUTO_AUGMENT_POLICIES: tuple[str, ...] = tuple(member.value for member in AutoAugmentPolicy)
SELECT_ON: tuple[str, ...] = tuple(member.value for member in SelectOn)

# Magnitude bins of TrivialAugmentWide and RandAugment in both torchvision and DALI: --rand-m indexes them.
NUM_MAGNITUDE_BINS = 31
MAX_RAND_M = NUM_MAGNITUDE_BINS - 1

# Share of JPEG decoding DALI's mixed decoder sends to the hardware JPEG engines (A100/H100 and
# later); the rest runs on the CUDA/CPU hybrid path. The benchmark sweeps it.
DEFAULT_HW_DECODER_LOAD: float = 0.65

# Decompression-bomb cap, checked from image headers before any decode: Pillow's own default.
DEFAULT_MAX_PIXELS: int = 89_478_485

# Files of a run directory (here, not in run_directory.py, so torch-free readers such as plot.py
# can import them).
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"
SPLITS_FILE = "splits.json"  # the held-out files of the run, so evaluate measures those same files

# What --device accepts, for every command: a regular expression matched against the whole value.
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"

# `msdali export`: the largest |onnxruntime - PyTorch| logit difference accepted in float32 (kernels
# sum in other orders, which moves logits by ~1e-5 on small nets; 1e-3 still catches any real graph
# error), and how many images of the run's test split the check runs on.
ONNX_TOLERANCE: float = 1e-3
ONNX_VERIFY_IMAGES: int = 64

# `msdali finetune-res`: a tenth of the default training rate (the network is trained already, and
# only the BatchNorm affine parameters and the classifier move).
FINETUNE_LR: float = 3e-4

# Exit code of `msdali train` when it stopped on SIGTERM/SIGINT after saving a checkpoint:
# EX_TEMPFAIL from sysexits.h, "try again later", which is what `--resume auto` then does.
EXIT_INTERRUPTED = 75
# The same code after the requeue signal (SIGUSR1 by default under SLURM, `--requeue-signal`): the
# checkpoint is saved and the job should run again, which is what "try again later" asks for, so a
# job script treats both stops alike (docker/slurm/train.sbatch requeues on it).
EXIT_REQUEUE = EXIT_INTERRUPTED
