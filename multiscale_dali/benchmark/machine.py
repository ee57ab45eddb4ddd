"""The machine a benchmark ran on: CPU, memory, GPU and library versions, as plain JSON values."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from multiscale_dali.benchmark.config import BYTES_PER_KIB
from multiscale_dali.benchmark.measure import load_1min


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    """Cores this process may run on (affinity and container limits), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * BYTES_PER_KIB / 2**30, 1)
    except OSError:
        pass
    return None


def _package_version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # absent or broken install: the report says so instead of failing
        return None


def _gpu_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def describe_machine(device: str) -> dict[str, Any]:
    """CPU, memory, GPU (on CUDA) and library versions, as plain JSON values."""
    from PIL import features

    machine: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": _package_version("torchvision"),
        "dali": _package_version("nvidia.dali"),
        "pillow": _package_version("PIL"),
        "pillow_libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "numpy": _package_version("numpy"),
        "device": device,
        "load_1min_at_start": load_1min(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        machine.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_driver": _gpu_driver(),
            "cuda_runtime": torch.version.cuda,
        })
    return machine
