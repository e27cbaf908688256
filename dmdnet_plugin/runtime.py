"""Where and how the model runs: the device and precision rule, and CPU tuning.

The device and precision rule is here once, so the CLI, ComfyUI and Gradio agree on it.

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

import torch

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


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_precision(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute precision every surface uses. ``None``/``"auto"``: fp16 on CUDA, fp32 on CPU.

    CPU stays fp32 because bf16 measured slower than fp32 for inference on this project's CPU
    (docs/speed.md); bf16 remains available on request.
    """
    if isinstance(precision, torch.dtype):
        return precision
    if precision is None or precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(precision).lower()]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}") from None
