"""The smallest input size each model runs at, found by running it, not from a table.

Deep networks downsample their input many times; below some size a layer's kernel is larger than
what is left of the image, and the forward pass fails (``convnext_tiny`` needs 32 px). Training
would find that out mid-run, after the data has been read; :func:`check_model_scales` finds it
before, in milliseconds: the model is built on PyTorch's ``meta`` device, where tensors have shapes
but no storage, so a forward pass only checks shapes. Should an operator lack a meta kernel, the
search repeats with a real forward on the CPU (batch of one, no gradients).
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch
from torch import nn

from multiscale_dali.errors import ConfigError
from multiscale_dali.models.registry import IMAGE_CHANNELS, ModelError, build_model, is_timm_name

log = logging.getLogger(__name__)

# The search gives up above this size: a network that cannot run at 4096 px is not a size problem.
MAX_PROBE_SCALE = 4096
META = torch.device("meta")
CPU = torch.device("cpu")


def _runs(model: nn.Module, size: int, device: torch.device) -> Exception | None:
    """None when ``model`` maps a ``size`` x ``size`` image to logits, else the error it raised.

    A missing meta kernel (NotImplementedError) is not an answer about the size; it propagates.
    """
    try:
        with torch.no_grad():
            model(torch.zeros(1, IMAGE_CHANNELS, size, size, device=device))
    except NotImplementedError:
        raise
    except (RuntimeError, ValueError) as err:  # a kernel larger than the input, an empty feature map
        return err
    return None


def _search(model: nn.Module, device: torch.device, name: str) -> int:
    """The smallest size that runs, by doubling and then bisecting.

    Every conv and pooling layer's output size is a non-decreasing function of its input size, so
    the sizes that run are all sizes from the smallest one up: a bisection finds it exactly.
    """
    failed, size = 0, 1
    while (error := _runs(model, size, device)) is not None:
        if size >= MAX_PROBE_SCALE:
            raise ModelError(f"{name} does not run at any input size up to {MAX_PROBE_SCALE} px: {error}")
        failed, size = size, min(2 * size, MAX_PROBE_SCALE)
    works = size
    while works - failed > 1:
        middle = (failed + works) // 2
        if _runs(model, middle, device) is None:
            works = middle
        else:
            failed = middle
    return works


@functools.lru_cache(maxsize=None)
def smallest_scale(name: str, *, num_outputs: int) -> int:
    """The smallest square input (pixels) that model ``name`` runs at; cached per (name, num_outputs).

    Raises :class:`ModelError` for an unknown model (the registry's message) or one that runs at no size.
    """
    try:
        with META:
            model = build_model(name, num_outputs=num_outputs).eval()
        return _search(model, META, name)
    except NotImplementedError as err:
        log.debug("%s has an operator without a meta kernel (%s); probing input sizes on the CPU", name, err)
    return _search(build_model(name, num_outputs=num_outputs).eval(), CPU, name)


def check_timm_scales(name: str, scales: Sequence[int], *, num_outputs: int) -> None:
    """A timm model run at each of ``scales`` on the meta device (shapes only), logits of one shape.

    No smallest-size search here: a ViT runs only at multiples of its patch size, so the sizes it
    accepts are not an interval; each scale the run uses is tried instead.
    """
    from multiscale_dali.models.timm_models import TimmModelError, check_resolution_independence

    with META:
        model = build_model(name, num_outputs=num_outputs).eval()
    try:
        check_resolution_independence(model, scales=scales, device=META)
        return
    except TimmModelError as err:
        # The meta device may lack an operator's kernel: such a failure is confirmed by a real forward.
        if "NotImplementedError" not in str(err) and "meta" not in str(err):
            raise TimmModelError(f"{name}: {err}") from None
        log.debug("%s failed its scale check on the meta device (%s); confirming on the CPU", name, err)
    try:
        check_resolution_independence(build_model(name, num_outputs=num_outputs).eval(), scales=scales)
    except TimmModelError as err:
        raise TimmModelError(f"{name}: {err}") from None


def check_model_scales(name: str, scales: Sequence[int], *, num_outputs: int) -> None:
    """Raise :class:`ModelError` when model ``name`` cannot run at one of ``scales``.

    The message is one line: the model, the scales it cannot run at, and the smallest one it can.
    timm models (``timm:NAME``) are checked at each scale instead (:func:`check_timm_scales`).
    """
    if is_timm_name(name):
        check_timm_scales(name, scales, num_outputs=num_outputs)
        return
    smallest = smallest_scale(name, num_outputs=num_outputs)
    too_small = sorted(scale for scale in set(scales) if scale < smallest)
    if too_small:
        listed = ", ".join(f"{scale} px" for scale in too_small)
        raise ModelError(f"{name} cannot run at {listed}: the smallest scale it accepts is {smallest} px (its "
                         f"layers shrink smaller images to nothing); use scales of at least {smallest} px "
                         "or a shallower model")


@functools.lru_cache(maxsize=None)
def _single_sample_error(name: str, scale: int, num_outputs: int) -> str | None:
    """What a training-mode forward of one ``scale`` px sample raises (BatchNorm over a 1x1 map
    has one value per channel and no variance), or None when it runs."""

    def attempt(device: torch.device) -> str | None:
        with device:
            model = build_model(name, num_outputs=num_outputs).train()
        try:
            with torch.no_grad():
                model(torch.zeros(1, IMAGE_CHANNELS, scale, scale, device=device))
        except ValueError as err:
            return str(err)
        except RuntimeError:  # a size problem: check_model_scales reports those
            return None
        return None

    try:
        return attempt(META)
    except NotImplementedError:
        return attempt(CPU)


def check_train_batch(name: str, scales: Sequence[int], *, batch_size: int, num_outputs: int) -> None:
    """Raise :class:`ConfigError` on ``batch_size`` when model ``name`` cannot train on batches of
    that many samples at the smallest of ``scales``: BatchNorm refuses a single value per channel,
    which a batch of one gives wherever a layer's feature map is down to 1x1."""
    if batch_size > 1:
        return
    scale = min(scales)
    error = _single_sample_error(name, scale, num_outputs)
    if error is not None:
        raise ConfigError("batch_size", f"{name} cannot train on a batch of {batch_size} at {scale} px: its "
                          f"BatchNorm layers then see one value per channel ({error}); use --batch-size 2 or "
                          "more, or larger --scales")
