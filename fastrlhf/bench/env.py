"""The machine and software a run measures: versions, CPU model, GPU bandwidth, device tag."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from typing import Optional

import torch

# HBM bandwidth, bytes/s, from NVIDIA's datasheets; matched against the device name in order
# (PCIe / NVL parts of the same chip have different memory systems).
GPU_PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def versions() -> dict[str, Optional[str]]:
    import fastrlhf

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastrlhf": getattr(fastrlhf, "__version__", None),
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
    }
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        out["fastrlhf_commit"] = commit or None
    except (OSError, subprocess.SubprocessError):
        out["fastrlhf_commit"] = None
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak_bandwidth(name: str) -> Optional[float]:
    for key, bw in GPU_PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return None


def device_tag(mode: str, gpu_name: str = "") -> str:
    """``cpu``; for GPUs the chip (``h100``, ``h200``) or the sanitized device name."""
    if mode == "cpu":
        return "cpu"
    for chip in ("H200", "H100", "A100", "L40S", "A10G", "L4"):
        if chip.lower() in gpu_name.lower():
            return chip.lower()
    return "".join(c if c.isalnum() else "-" for c in gpu_name.lower()).strip("-") or "gpu"


def default_out_dir(tag: str) -> str:
    """``benchmarks/results/<tag>`` of this checkout (``benchmarks/`` sits next to the package), else ./benchmarks."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = os.path.join(root, "benchmarks") if os.path.isdir(os.path.join(root, "benchmarks")) else "benchmarks"
    return os.path.join(base, "results", tag)
