"""Where and how the model runs: the device and precision rule, and CPU tuning.

The device and precision rule is here once, so the CLI, ComfyUI and Gradio agree on it. On CPU,
``auto`` takes bf16 where the processor computes it natively (AVX512-BF16 or AMX) and a short
calibration, cached per machine and torch version, finds it faster than fp32; fp32 elsewhere.

glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free. DMDNet
allocates about 800 MiB of 64 MiB activations per face, so without tuning a third of CPU
inference time goes to page faults in the kernel. Keeping freed memory in the heap removes
them (measured in benchmarks/bench_model.py). Set DMDNET_NO_MALLOC_TUNING=1 to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

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


def precision_name(dtype: torch.dtype) -> str:
    """The name a compute precision goes by in options and reports (``fp32``, ``bf16``, ``fp16``)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError("unknown or unsupported device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU here; use cpu")
    return device


def pick_precision(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute precision every surface uses. ``None``/``"auto"``: fp16 on CUDA; on CPU bf16
    where :func:`bf16_is_faster`, else fp32 (``fp32`` gives exact results everywhere)."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision is None or precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and bf16_is_faster() else torch.float32
    try:
        return _DTYPES[str(precision).lower()]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}") from None


def cache_dir() -> Path:
    """Per-user folder where downloaded or hand-placed weights (and this machine's calibration) are kept."""
    root = os.environ.get("DMDNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dmdnet"
    )
    return Path(root)


def cpu_flags() -> set[str]:
    """The processor's feature flags (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _machine_key() -> str:
    """This CPU (model and flags), torch's version and thread count: what the calibration depends on."""
    try:
        model = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    raw = json.dumps([model, sorted(cpu_flags()), torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _conv_seconds(dtype: torch.dtype, reps: int = 4) -> float:
    """Best time of a 3x3 convolution pair as DMDNet runs them (64 channels, 128x128, channels_last)."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.rand(2, 64, 128, 128).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(reps + 1):  # the first run is a warm-up (kernel selection)
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
    return best


def bf16_is_faster() -> bool:
    """bf16 on this CPU: native (AVX512-BF16 or AMX) and at least 1.2x fp32's speed in a short
    calibration (about a second, once; cached in ``cache_dir()/precision.json`` by machine and torch
    version). CPUs without native bf16 emulate it, slower than fp32."""
    if not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return False
    path, key = cache_dir() / "precision.json", _machine_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict) or not isinstance(cached.get(key), dict):
        fp32, bf16 = _conv_seconds(torch.float32), _conv_seconds(torch.bfloat16)
        cached = {**(cached if isinstance(cached, dict) else {}), key: {"fp32_s": fp32, "bf16_s": bf16}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:  # a read-only home: calibrate again next time
            pass
    entry = cached[key]
    return entry["bf16_s"] * 1.2 <= entry["fp32_s"]
