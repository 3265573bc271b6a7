"""Whole-process memory measurement: resident set size and its high-water mark (Linux VmHWM)."""

from __future__ import annotations

import os
import resource

__all__ = ["current_rss", "peak_rss", "reset_peak"]


def _status_field(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    v = _status_field("VmRSS")
    if v is not None:
        return v
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def peak_rss() -> int:
    """Peak resident set size of this process since start (or since ``reset_peak``), in bytes."""
    v = _status_field("VmHWM")
    if v is not None:
        return v
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0). True on success."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
