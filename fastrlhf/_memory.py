"""Resident memory of this process: the one peak-RSS helper for benchmarks and training logs.

Linux keeps a high-water mark of the resident set, ``VmHWM`` in ``/proc/self/status``.
Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) moves it down to the current RSS, so

    before = rss_bytes(); reset_peak_rss(); step(); added = peak_rss_bytes() - before

is the memory ``step`` added at its peak. Resolution about 0.25 MiB: the kernel keeps RSS in
per-CPU counters. RSS follows live tensors only if freed blocks go back to the OS (glibc:
``MALLOC_MMAP_THRESHOLD_`` or ``mallopt``, see ``fastrlhf.bench.measure``).

Standard library only, so that ``fastrlhf.algos``, ``fastrlhf.bench`` and the ``python -c``
children of the scripts under ``benchmarks/`` can all import it.
"""

from __future__ import annotations

import sys
from typing import Optional


def _status_bytes(key: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> Optional[int]:
    """Current resident set (``VmRSS``); None off Linux."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set since start or since :func:`reset_peak_rss` (``VmHWM``).

    Off Linux the lifetime peak from ``getrusage`` (not resettable); None where neither exists.
    """
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, the others KiB


def reset_peak_rss() -> bool:
    """Move ``VmHWM`` down to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
