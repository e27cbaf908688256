"""Reading tensor files that strangers share (checkpoints, identity dictionaries) without trusting them.

Both kinds are safetensors: no code runs when they are opened. This module adds what the format
leaves to the reader: a bound on the header (so a file cannot make us parse megabytes of
metadata), and checks that every tensor is floating point and finite, so that a NaN atom or an
integer weight is refused when the file is opened rather than found later as a black face.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .userfiles import checked_name, unreadable


class TensorFileError(ValueError):
    """The file is not a usable tensor file; the message says why (the caller adds the path)."""


def read_safetensors(path: Path, max_header: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file whose header is at most ``max_header`` bytes."""
    try:
        with checked_name(path) as name:
            return _read(name, max_header)
    except (FileNotFoundError, IsADirectoryError):
        raise  # the callers name these in their own words
    except OSError as exc:  # no permission, a FIFO, a link loop, /proc files that cannot seek
        raise TensorFileError(unreadable(exc)) from None


def _read(name: str, max_header: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with open(name, "rb") as f:
        head = f.read(8)
        size = f.seek(0, 2)
    if len(head) < 8:
        raise TensorFileError(f"too short for a safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > max_header:
        raise TensorFileError(f"header claims {header_len} bytes, more than the {max_header} this kind of file needs")
    if 8 + header_len > size:
        raise TensorFileError(f"truncated: header claims {header_len} bytes, the file has {size - 8} after it")
    try:
        with safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors reports each kind of corruption with its own exception type
        raise TensorFileError(f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, meta


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor floating point and finite; the first offender is named."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TensorFileError(f"tensor {name} has dtype {t.dtype}, expected floating point")
        wide = t if t.dtype in (torch.float32, torch.float64) else t.float()  # CPU isfinite is slow in half
        if not bool(torch.isfinite(wide).all()):
            raise TensorFileError(f"tensor {name} holds NaN or Inf values")


def json_field(meta: dict[str, str], key: str) -> object:
    """A metadata entry that holds JSON, with a clear error when it does not."""
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise TensorFileError(f"metadata {key!r} is not valid JSON ({exc})") from None
