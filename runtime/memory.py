"""Whole-process memory measurement: resident set size and its high-water mark (Linux VmHWM)."""

from __future__ import annotations

import os
import resource

__all__ = ["current_rss", "peak_rss", "reset_peak", "tune_malloc", "window_peak"]


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


_before_reset = 0  # the highest mark seen before any reset_peak(): whole-run peaks keep it


def window_peak() -> int:
    """Peak resident set size since the last ``reset_peak`` (or since start), in bytes."""
    v = _status_field("VmHWM")
    if v is not None:
        return v
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss() -> int:
    """Peak resident set size of this process since it started, in bytes (resets included)."""
    return max(window_peak(), _before_reset)


def reset_peak() -> bool:
    """Start a new measuring window: reset the kernel's high-water mark to the current RSS
    (Linux >= 4.0), remembering the old mark for ``peak_rss``. True on success."""
    global _before_reset
    _before_reset = max(_before_reset, window_peak())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tune_malloc(mmap_threshold: int = 1 << 16) -> bool:
    """Make glibc return large freed blocks to the OS at once (Linux/glibc only).

    glibc raises its mmap threshold after each large free (up to 32 MB), after which tensors of
    a few MB come from the heap and stay resident after they are freed; a training step's
    transient buffers then pile up as RSS. Fixing the threshold keeps every block of
    ``mmap_threshold`` bytes or more in its own mapping, released on free. Returns True if set.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) == 1
        libc.mallopt(m_trim_threshold, int(mmap_threshold))
        libc.mallopt(m_arena_max, 2)  # per-thread arenas otherwise keep freed memory each
        return ok
    except (OSError, AttributeError):
        return False
