"""The environment facts a run and an evaluation record beside their numbers: versions, the device, the CPU's model.

The same seeded run gives other numbers on another CPU model or library version, so every config, evaluation
report and benchmark writes these with its figures.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import accelerate
import timm
import torch


def versions() -> dict[str, str]:
    """The versions that change a run's numbers: Python, torch, Accelerate and timm."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "timm": timm.__version__,
    }


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. ``"NVIDIA H100 80GB HBM3"``), or the device type with the CPU's model (e.g.
    ``"cpu (AMD EPYC)"``): the same seeded run gives other numbers on another CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({cpu_name()})" if device.type == "cpu" else device.type


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), or ``"unknown CPU"``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
