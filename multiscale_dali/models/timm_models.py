"""timm classifiers (the optional ``timm`` extra), built to run at every training scale, offline.

Resolution independence: msdali feeds one set of weights several input sizes. timm's CNNs end in
global pooling and accept any size; its ViTs fix their position embeddings to one image size unless
built with ``dynamic_img_size=True`` (the embeddings are then interpolated to the input's patch grid),
so :func:`build_timm_model` passes that flag to every model that accepts it.
:func:`check_resolution_independence` proves the built model runs at each scale and returns logits of
one shape; run it before training rather than finding out at the first large-scale step.

Pretrained weights are never downloaded. :func:`build_timm_model` resolves the weight file itself
from the local caches, in timm's own order: the Hugging Face hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) for weights published there, then the torch hub
cache (``<torch.hub.get_dir()>/checkpoints``) for weights published by URL, and hands timm that
file (``pretrained_cfg_overlay=dict(file=...)``), so timm's loader never reaches its download code.
A missing file is a :class:`TimmModelError` naming every path looked at. ``HF_HUB_OFFLINE=1`` is also
set while the model is created, as a second guard for code paths that ask the hub directly (it only
takes effect where ``huggingface_hub`` is first imported there: the library reads it at import).

Model names are timm's (``resnet50``, ``vit_small_patch16_224.augreg_in21k``), optionally written
``timm:NAME``; ``hf-hub:`` and ``local-dir:`` names are refused (they read their configuration from
the hub or a folder rather than from timm's registry).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

from multiscale_dali.constants import IMAGENET_MEAN, IMAGENET_STD
from multiscale_dali.errors import UserError
from multiscale_dali.extras import MissingExtraError
from multiscale_dali.models.registry import IMAGE_CHANNELS, TIMM_PREFIX, ModelError

log = logging.getLogger(__name__)

TIMM_EXTRA = "timm"
_REFUSED_PREFIXES = ("hf-hub:", "local-dir:")
# timm's own preference: safetensors first, then the pickled PyTorch file.
HF_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
_DYNAMIC_SIZE_FLAG = "dynamic_img_size"
# Images per forward in the resolution check: 2, so a model that squeezes the batch axis shows it.
_CHECK_BATCH = 2
# The pipelines normalise with ImageNet statistics (in pixel units in constants.py).
_IMAGENET_MEAN_01 = tuple(round(m / 255, 3) for m in IMAGENET_MEAN)
_IMAGENET_STD_01 = tuple(round(s / 255, 3) for s in IMAGENET_STD)


class TimmModelError(ModelError, UserError):
    """A timm model that cannot be built as asked (unknown name, weights not cached, fixed input size)."""


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError as err:
        raise MissingExtraError(feature="timm models", extra=TIMM_EXTRA, cause=err) from None
    return timm


def timm_name(name: str) -> str:
    """``name`` without the optional ``timm:`` prefix; refuses hub and folder names."""
    if name.startswith(_REFUSED_PREFIXES):
        raise TimmModelError(f"model {name!r}: only timm registry names are supported (see list_timm_models); "
                             "hub and folder names would read configuration over the network or from disk")
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name


def list_timm_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """timm model names matching the shell-style ``pattern``; ``pretrained``: only those with weights
    published (with their tags, e.g. ``resnet50.a1_in1k``), whether cached here or not."""
    return list(_timm().list_models(pattern, pretrained=pretrained))


# ---------------------------------------------------------------------------------------- weights
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (as the hub library would)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _hf_candidates(hub_id: str, filename: str | None) -> list[tuple[str, str, str | None]]:
    repo, _, revision = hub_id.partition("@")
    files = [filename] if filename else list(HF_WEIGHT_FILES)
    return [(repo, name, revision or None) for name in files]


def _hf_snapshot_path(repo: str, filename: str, revision: str | None) -> str:
    """Where the hub cache keeps a file, for the error message (the real lookup goes through refs/)."""
    folder = "models--" + repo.replace("/", "--")
    return str(hub_cache_dir() / folder / "snapshots" / f"<{revision or 'main'} revision>" / filename)


def cached_weights(name: str) -> Path:
    """The locally cached pretrained weight file of timm model ``name``; never downloads.

    Raises :class:`TimmModelError` naming every path looked at when none exists, and when timm has
    no pretrained weights for ``name`` at all.
    """
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # an invalid tag
        raise TimmModelError(f"model {name!r}: {err}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise TimmModelError(f"timm publishes no pretrained weights for {name!r}; build it with pretrained=False")
    expected: list[str] = []
    if cfg.file:
        if Path(cfg.file).is_file():
            return Path(cfg.file)
        expected.append(str(cfg.file))
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for repo, filename, revision in _hf_candidates(cfg.hf_hub_id, cfg.hf_hub_filename):
            found = try_to_load_from_cache(repo, filename, cache_dir=str(hub_cache_dir()), revision=revision)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
            expected.append(_hf_snapshot_path(repo, filename, revision))
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
        expected.append(str(path))
    source = f"the Hugging Face repository {cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    raise TimmModelError(
        f"pretrained weights for timm model {name!r} are not in the local cache; nothing is downloaded here. "
        f"Expected one of: {'; '.join(expected)}. Fetch them from {source} on a machine with network access "
        "(e.g. `huggingface-cli download` into the same cache, then copy the cache folder), set HF_HUB_CACHE / "
        "TORCH_HOME to where they are, or build with pretrained=False."
    )


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _warn_on_other_statistics(name: str, cfg: Any) -> None:
    mean, std = tuple(round(v, 3) for v in cfg.mean), tuple(round(v, 3) for v in cfg.std)
    if (mean, std) != (_IMAGENET_MEAN_01, _IMAGENET_STD_01):
        log.warning("timm weights of %s were trained on inputs normalised with mean %s, std %s; msdali's "
                    "pipelines normalise with ImageNet's %s, %s, so fine-tuning starts from shifted inputs",
                    name, mean, std, _IMAGENET_MEAN_01, _IMAGENET_STD_01)


# ---------------------------------------------------------------------------------------- building
def _create(timm: ModuleType, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with ``dynamic_img_size=True`` where the architecture takes it."""
    try:
        return timm.create_model(name, **kwargs, **{_DYNAMIC_SIZE_FLAG: True})
    except TypeError as err:
        if _DYNAMIC_SIZE_FLAG not in str(err):
            raise
    return timm.create_model(name, **kwargs)


def build_timm_model(name: str, *, num_outputs: int, pretrained: bool = False) -> nn.Module:
    """timm model ``name`` with a head of ``num_outputs`` logits, resolution-independent where timm allows.

    ``pretrained=True`` loads the cached weights (see :func:`cached_weights`) before timm swaps in the
    new head. Raises :class:`TimmModelError` for an unknown name or uncached weights, and
    :class:`MissingExtraError` without timm.
    """
    timm = _timm()
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise TimmModelError(f"num_outputs must be a positive int, got {num_outputs!r}")
    name = timm_name(name)
    if not timm.is_model(name):
        raise TimmModelError(f"unknown timm model {name!r}; list them with `msdali models --timm '*PATTERN*'`")
    kwargs: dict[str, Any] = {"num_classes": num_outputs, "in_chans": IMAGE_CHANNELS}
    if pretrained:
        weights = cached_weights(name)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        _warn_on_other_statistics(name, timm.models.get_pretrained_cfg(name))
    try:
        with _hub_offline():
            model = _create(timm, name, **kwargs)
    except TimmModelError:
        raise
    except Exception as err:  # a corrupt or mismatched weight file, or a download attempt refused offline
        raise TimmModelError(f"cannot build timm model {name!r}{' with pretrained weights' if pretrained else ''}: "
                             f"{type(err).__name__}: {err}") from err
    log.debug("built timm model %s (%s outputs%s)", name, num_outputs, ", pretrained" if pretrained else "")
    return model


@torch.no_grad()
def check_resolution_independence(model: nn.Module, *, scales: Sequence[int],
                                  device: torch.device | str = "cpu") -> None:
    """Run ``model`` on a small batch at every scale; raise :class:`TimmModelError` naming the first scale
    it fails at, or where its logits change shape. The model's train/eval mode is left as it was."""
    if not scales:
        raise ValueError("check_resolution_independence needs at least one scale")
    was_training = model.training
    model.eval()
    shapes: dict[int, tuple[int, ...]] = {}
    try:
        for scale in sorted(set(scales)):
            images = torch.zeros(_CHECK_BATCH, IMAGE_CHANNELS, scale, scale, device=device)
            try:
                shapes[scale] = tuple(model(images).shape)
            except Exception as err:  # the model's own size assertions have many exception types
                raise TimmModelError(f"{type(model).__name__} does not run at {scale} px: {type(err).__name__}: "
                                     f"{str(err).rstrip('.')}. Use a model with global pooling, or a ViT built with "
                                     f"{_DYNAMIC_SIZE_FLAG}=True and scales divisible by its patch size") from None
            first = next(iter(shapes.values()))
            if shapes[scale] != first:
                raise TimmModelError(f"{type(model).__name__} returns logits shaped {list(shapes[scale])} at "
                                     f"{scale} px but {list(first)} at {min(shapes)} px: not resolution-independent")
    finally:
        model.train(was_training)
