"""Pick a backend and build loaders; the only place that decides between DALI and torchvision."""

from __future__ import annotations

import importlib.util
import logging

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
    """``auto`` -> ``dali`` when it imports, else ``torchvision``; ``dali`` without DALI is an error."""
    if backend == "auto":
        chosen = "dali" if dali_installed() else "torchvision"
        log.info("backend auto: using %s%s", chosen, "" if chosen == "dali" else f" ({DALI_INSTALL_HINT})")
        return chosen
    if backend == "dali" and not dali_installed():
        raise ConfigError("backend", DALI_INSTALL_HINT)
    if backend not in ("dali", "torchvision"):
        raise ConfigError("backend", f"unknown backend {backend!r}; choose from auto, dali, torchvision")
    return backend


def build_loader(spec: LoaderSpec, *, backend: str) -> Loader:
    """A loader of ``backend`` (already resolved: ``dali`` or ``torchvision``) for ``spec``."""
    if backend == "dali":
        from multiscale_dali.pipelines.dali.pipeline import DaliLoader

        return DaliLoader(spec)
    if backend == "torchvision":
        from multiscale_dali.pipelines.torchvision_backend import TorchvisionLoader

        return TorchvisionLoader(spec)
    raise ValueError(f"unknown backend {backend!r}; choose from dali, torchvision")


def dali_version() -> str | None:
    """DALI's version from package metadata, without importing DALI (only its module may)."""
    from importlib import metadata

    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
