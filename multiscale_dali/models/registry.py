"""The model registry: a small CNN of our own plus torchvision classifiers with a resized head.

Every model ends in global average pooling, so one set of weights runs at every training scale.

Pretrained weights are never downloaded (our machines have no network): ``pretrained=True`` looks
for torchvision's weight file where ``torch.hub`` would have cached it,
``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``, and fails with the path to
place it at when it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tv_models

from multiscale_dali.errors import UserError

TINY_CNN = "tiny_cnn"
# `--model timm:NAME` builds timm model NAME (the optional timm extra; see timm_models.py).
TIMM_PREFIX = "timm:"
# Output channels of tiny_cnn's conv-BN-ReLU blocks; each block halves the resolution, so a
# 64 px input ends at 4x4 and 128 px at 8x8 before pooling. About 0.1M parameters: trains in
# seconds on two CPU cores.
TINY_CNN_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
TINY_CNN_KERNEL = 3
TINY_CNN_STRIDE = 2
IMAGE_CHANNELS = 3


class ModelError(UserError, ValueError, flag="--model"):
    """A model that cannot be built as asked: unknown name, bad head width, weights unavailable."""


class TinyCNN(nn.Module):
    """Strided conv-BN-ReLU blocks, global average pooling and a linear head."""

    def __init__(self, *, num_outputs: int, widths: tuple[int, ...] = TINY_CNN_WIDTHS) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = IMAGE_CHANNELS
        for out_channels in widths:
            blocks += [
                # No conv bias: the BatchNorm right after it has its own shift.
                nn.Conv2d(
                    in_channels,
                    out_channels,
                    TINY_CNN_KERNEL,
                    stride=TINY_CNN_STRIDE,
                    padding=TINY_CNN_KERNEL // 2,
                    bias=False,
                ),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        # Adaptive pooling is what makes the network resolution-agnostic.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_outputs)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _replace_last_linear(container: nn.Sequential, num_outputs: int) -> None:
    last = container[-1]
    if not isinstance(last, nn.Linear):
        raise ModelError(f"expected the classifier to end in nn.Linear, found {type(last).__name__}")
    container[-1] = nn.Linear(last.in_features, num_outputs)


def _replace_resnet_head(model: nn.Module, num_outputs: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_outputs)


def _replace_classifier_head(model: nn.Module, num_outputs: int) -> None:
    # mobilenet_v3, efficientnet and convnext all end their `classifier` Sequential in the Linear.
    _replace_last_linear(model.classifier, num_outputs)


@dataclass(frozen=True)
class _TorchvisionEntry:
    builder: Callable[..., nn.Module]
    weights: tv_models.WeightsEnum  # the DEFAULT (best) ImageNet weights
    replace_head: Callable[[nn.Module, int], None]
    family: str


_TORCHVISION: dict[str, _TorchvisionEntry] = {
    "resnet18": _TorchvisionEntry(
        tv_models.resnet18, tv_models.ResNet18_Weights.DEFAULT, _replace_resnet_head, "ResNet-18"
    ),
    "resnet50": _TorchvisionEntry(
        tv_models.resnet50, tv_models.ResNet50_Weights.DEFAULT, _replace_resnet_head, "ResNet-50"
    ),
    "mobilenet_v3_small": _TorchvisionEntry(
        tv_models.mobilenet_v3_small,
        tv_models.MobileNet_V3_Small_Weights.DEFAULT,
        _replace_classifier_head,
        "MobileNetV3-Small",
    ),
    "mobilenet_v3_large": _TorchvisionEntry(
        tv_models.mobilenet_v3_large,
        tv_models.MobileNet_V3_Large_Weights.DEFAULT,
        _replace_classifier_head,
        "MobileNetV3-Large",
    ),
    "efficientnet_b0": _TorchvisionEntry(
        tv_models.efficientnet_b0,
        tv_models.EfficientNet_B0_Weights.DEFAULT,
        _replace_classifier_head,
        "EfficientNet-B0",
    ),
    "convnext_tiny": _TorchvisionEntry(
        tv_models.convnext_tiny,
        tv_models.ConvNeXt_Tiny_Weights.DEFAULT,
        _replace_classifier_head,
        "ConvNeXt-Tiny",
    ),
}


def list_available_models() -> list[str]:
    return sorted([TINY_CNN, *_TORCHVISION])


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def _unknown_model(name: str) -> ModelError:
    return ModelError(f"unknown model {name!r}; available: {', '.join(list_available_models())}, or "
                      f"{TIMM_PREFIX}NAME for a timm model (`msdali models --timm PATTERN` lists them)")


def pretrained_weights_path(name: str) -> str:
    """Where ``torch.hub`` caches the torchvision weights of ``name`` (the file may not exist)."""
    if name == TINY_CNN:
        raise ModelError(f"model {TINY_CNN!r} has no pretrained weights; build it with pretrained=False")
    entry = _TORCHVISION.get(name)
    if entry is None:
        raise _unknown_model(name)
    filename = os.path.basename(urlparse(entry.weights.url).path)
    # get_dir() re-reads TORCH_HOME on every call, so it follows the environment of this process.
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _load_cached_weights(name: str, model: nn.Module) -> None:
    path = pretrained_weights_path(name)
    if not os.path.isfile(path):
        url = _TORCHVISION[name].weights.url
        raise ModelError(
            f"pretrained weights for {name!r} are not in the torch hub cache: expected {path}. "
            f"Nothing is downloaded here; fetch {url} on a machine with network access and copy it "
            f"to that path (set TORCH_HOME to use another cache), or build with pretrained=False."
        )
    try:
        # weights_only: a weight file is data and must not be able to run code when unpickled.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except Exception as exc:  # corrupt file, wrong architecture, pickled objects: all one answer
        raise ModelError(f"could not load pretrained weights for {name!r} from {path}: {exc}") from exc


def build_model(name: str, *, num_outputs: int, pretrained: bool = False) -> nn.Module:
    """Build ``name`` with a head of ``num_outputs`` logits (1 for a binary task); ``timm:NAME`` builds
    timm's model NAME (see :mod:`~multiscale_dali.models.timm_models`).

    ``pretrained=True`` loads torchvision's ImageNet weights from the local hub cache (never the
    network) before the head is replaced, so only the new head starts untrained.
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ModelError(f"num_outputs must be a positive int, got {num_outputs!r}")
    if is_timm_name(name):
        # Imported here: timm_models imports this module, and timm is an optional extra.
        from multiscale_dali.models.timm_models import build_timm_model

        return build_timm_model(name, num_outputs=num_outputs, pretrained=pretrained)
    if name == TINY_CNN:
        if pretrained:
            raise ModelError(
                f"model {TINY_CNN!r} has no pretrained weights; build it with pretrained=False"
            )
        return TinyCNN(num_outputs=num_outputs)
    entry = _TORCHVISION.get(name)
    if entry is None:
        raise _unknown_model(name)
    # Always build the ImageNet-shaped model and swap the head: the same code path with and
    # without weights, and the checkpoint's 1000-way head fits before it is replaced.
    model = entry.builder(weights=None)
    if pretrained:
        _load_cached_weights(name, model)
    entry.replace_head(model, num_outputs)
    return model


def _format_count(count: int) -> str:
    for threshold, suffix in ((1_000_000, "M"), (1_000, "K")):
        if count >= threshold:
            return f"{count / threshold:.1f}{suffix}"
    return str(count)


def describe_models() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every model, sorted by name, for ``msdali models``."""
    descriptions: dict[str, str] = {}
    tiny_params = sum(p.numel() for p in TinyCNN(num_outputs=1).parameters())
    descriptions[TINY_CNN] = (
        f"{len(TINY_CNN_WIDTHS)} strided conv-BN-ReLU blocks + global pooling, "
        f"~{_format_count(tiny_params)} params, no pretrained weights; fast on CPU"
    )
    for name, entry in _TORCHVISION.items():
        # torchvision's own metadata, counted with the 1000-way ImageNet head.
        params = entry.weights.meta["num_params"]
        descriptions[name] = (
            f"torchvision {entry.family}, ~{_format_count(params)} params (ImageNet head); "
            f"pretrained={entry.weights.name} from the local hub cache"
        )
    return [(name, descriptions[name]) for name in list_available_models()]
