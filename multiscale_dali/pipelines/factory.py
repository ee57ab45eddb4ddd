"""Pick a backend and build loaders; the only place that decides between DALI and torchvision."""

from __future__ import annotations

import importlib.util
import logging

from multiscale_dali.constants import Backend
from multiscale_dali.errors import ConfigError
from multiscale_dali.pipelines.spec import Loader, LoaderSpec

log = logging.getLogger(__name__)

DALI_INSTALL_HINT = (
    "DALI is not installed: pip install nvidia-dali-cuda120 (Linux), or use --backend torchvision"
)


def dali_installed() -> bool:
    # find_spec on the parent first: find_spec("nvidia.dali") imports "nvidia", which may be absent.
    return importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.dali") is not None
    )


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``dali`` when it imports, else ``torchvision``; ``dali`` without DALI is an error.

    Returns the plain string (``Backend.X.value``): it is recorded in configs and checkpoints.
    """
    if backend == Backend.AUTO:
        chosen = Backend.DALI if dali_installed() else Backend.TORCHVISION
        log.info("backend auto: using %s%s", chosen, "" if chosen == Backend.DALI else f" ({DALI_INSTALL_HINT})")
        return chosen.value
    if backend == Backend.DALI and not dali_installed():
        raise ConfigError("backend", DALI_INSTALL_HINT)
    if backend not in (Backend.DALI, Backend.TORCHVISION):
        raise ConfigError("backend", f"unknown backend {backend!r}; choose from {', '.join(Backend)}")
    return Backend(backend).value


def build_loader(spec: LoaderSpec, *, backend: str) -> Loader:
    """A loader of ``backend`` (already resolved: ``dali`` or ``torchvision``) for ``spec``."""
    if backend == Backend.DALI:
        from multiscale_dali.pipelines.dali.loader import DaliLoader

        return DaliLoader(spec)
    if backend == Backend.TORCHVISION and spec.shards is not None:
        from multiscale_dali.pipelines.torchvision_shards import TorchvisionShardLoader

        return TorchvisionShardLoader(spec)
    if backend == Backend.TORCHVISION:
        from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader

        return TorchvisionLoader(spec)
    raise ValueError(f"unknown backend {backend!r}; choose from {Backend.DALI}, {Backend.TORCHVISION}")


def dali_version() -> str | None:
    """DALI's version from package metadata, without importing DALI (only its module may)."""
    from importlib import metadata

    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
