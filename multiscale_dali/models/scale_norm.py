"""Private BatchNorm per training scale: the convolutions are shared, each resolution has its own
normalisation (running statistics, scale and shift).

Why: a multi-scale step normalises every scale with that scale's batch statistics, but a shared
BatchNorm keeps one running average over all of them and one affine transform, so at evaluation a
resolution is normalised with statistics that describe none of the trained ones, and the shared scale
and shift are a compromise. Strong augmentation widens the gap: on held-out digits, TrivialAugment in
a multi-scale run cost 13 points at the top scale with shared BatchNorm. Resolution-switchable
networks (RS-Nets, Wang et al., ECCV 2020) keep BatchNorm private per resolution for this reason;
the cost is four numbers per channel, layer and scale. Measured here: docs/results.md.

The network picks the branch from its input: the trained scale nearest to the input's side (in
log ratio; sqrt(H*W) for a non-square input), so training, evaluation, prediction and BN
recalibration at any size need no extra argument. A size between two trained scales takes the nearer
one; a tie takes the larger. An ONNX graph cannot branch on its input size: an export carries one
branch (:func:`collapse_scale_norm`, used by ``msdali export`` and ``finetune-res``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle


def nearest_scale(side: float, scales: Sequence[int]) -> int:
    """The scale of ``scales`` nearest to ``side`` in log ratio; on a tie the larger one."""
    if side <= 0:
        raise ValueError(f"an input side must be > 0, got {side}")
    # Rounded so that a side exactly between two scales (their geometric mean) is a tie in floats too.
    return min(scales, key=lambda s: (round(abs(math.log(side / s)), 9), -s))


class ScaleSelector:
    """The branch every :class:`ScaleBatchNorm` of one network uses, set from the network's input.

    A plain object shared by the network's layers; a forward pre-hook on the network (a bound
    method, so ``copy.deepcopy`` of the network, e.g. a weight EMA, hooks its own selector) sets it.
    """

    def __init__(self, scales: Sequence[int]) -> None:
        self.scales = tuple(sorted(int(s) for s in scales))
        self.current = self.scales[-1]
        self.hook: RemovableHandle | None = None  # the network's pre-hook that calls select

    def select(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        images = args[0]
        if isinstance(images, torch.Tensor) and images.dim() >= 3:
            self.current = nearest_scale(math.sqrt(images.shape[-2] * images.shape[-1]), self.scales)


class ScaleBatchNorm(nn.Module):
    """One copy of a BatchNorm layer per trained scale; the selector says which one runs."""

    def __init__(self, norm: _BatchNorm, selector: ScaleSelector) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({str(scale): copy.deepcopy(norm) for scale in selector.scales})
        self.selector = selector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[str(self.selector.current)](x)

    def extra_repr(self) -> str:
        return f"scales={list(self.selector.scales)}"


def private_scale_norm(net: nn.Module, scales: Sequence[int]) -> nn.Module:
    """``net`` with every BatchNorm layer (SyncBatchNorm and subclasses such as timm's included)
    replaced in place by a :class:`ScaleBatchNorm` over ``scales``; each copy starts from the layer's
    own values (pretrained ones included). Returns ``net``.

    The state-dict keys of a layer ``bn`` become ``bn.norms.<scale>.*``: a checkpoint records the
    choice in its configuration, and the model is rebuilt the same way before its weights load.
    """
    if len(scales) < 1:
        raise ValueError("private_scale_norm needs at least one scale")
    selector = ScaleSelector(scales)

    def replace(module: nn.Module) -> int:
        count = 0
        for name, child in module.named_children():
            if isinstance(child, _BatchNorm):
                setattr(module, name, ScaleBatchNorm(child, selector))
                count += 1
            elif not isinstance(child, ScaleBatchNorm):
                count += replace(child)
        return count

    if isinstance(net, _BatchNorm):
        raise ValueError("private_scale_norm converts the BatchNorm layers inside a network, not a lone layer")
    if replace(net):
        selector.hook = net.register_forward_pre_hook(selector.select)
    return net


def collapse_scale_norm(net: nn.Module, scale: int) -> nn.Module:
    """``net`` with each :class:`ScaleBatchNorm` replaced in place by its branch for ``scale`` (the
    nearest trained one): a plain network for one resolution, as FixRes fine-tuning makes. Returns ``net``."""
    selectors: set[ScaleSelector] = set()

    def replace(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, ScaleBatchNorm):
                selectors.add(child.selector)
                setattr(module, name, child.norms[str(nearest_scale(scale, child.selector.scales))])
            else:
                replace(child)

    replace(net)
    for selector in selectors:
        if selector.hook is not None:
            selector.hook.remove()
    return net


def has_private_scale_norm(net: nn.Module) -> bool:
    return any(isinstance(module, ScaleBatchNorm) for module in net.modules())
