"""multiscale-dali: decode-once multi-scale data pipelines (DALI or torchvision) and trainers."""

__version__ = "0.1.0"
