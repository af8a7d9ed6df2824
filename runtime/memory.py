"""Process memory helpers: large host buffers, give freed heap back to the OS, read current and peak
resident set size."""

from __future__ import annotations

import contextlib
import gc
import mmap
import sys

import numpy as np

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page


def host_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of `nbytes` for large copies (KV snapshots), freed with the array.

    From HUGE_PAGE on it is its own anonymous mapping advised for transparent huge pages (Linux, where
    THP is "always" or "madvise"), so its first touch faults 2 MiB at a time instead of 4 KiB: several
    times faster to fill where page faults are dear, as in a VM (docs/benchmarks.md, figures behind
    decisions in code). Elsewhere, or smaller, it is np.empty."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(nbytes, np.uint8)
    m = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
    with contextlib.suppress(OSError):  # THP off ("never") or not built in: plain pages
        m.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(m, np.uint8, count=nbytes)


def release_heap(collect: bool = False) -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise); `collect` runs the GC first."""
    if collect:
        gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (Linux), or None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (VmHWM on Linux; ru_maxrss elsewhere)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None
