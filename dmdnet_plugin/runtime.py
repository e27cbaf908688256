"""Process-level CPU tuning that the model's speed depends on.

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free. DMDNet
allocates about 800 MiB of 64 MiB activations per face, so without tuning a third of CPU
inference time goes to page faults in the kernel. Keeping freed memory in the heap removes
them (measured in benchmarks/bench_model.py). Set DMDNET_NO_MALLOC_TUNING=1 to opt out.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def tune_cpu_allocator() -> bool:
    """Make glibc keep and reuse freed memory; returns whether it was applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DMDNET_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    return _done
