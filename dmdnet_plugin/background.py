"""The rest of the photo, upscaled by a super-resolution model: GFPGAN's and CodeFormer's ``--bg_upsampler``.

Any single-image super-resolution model that spandrel (the loader of ComfyUI, chaiNNer and Forge)
recognises from its state dict: Real-ESRGAN's RRDBNet, SwinIR, HAT, DAT, OmniSR and others. The file
is read without unpickling (``torch.load(weights_only=True)`` or safetensors) and handed to spandrel
as a state dict. The photo is upscaled by the model's scale in overlapping tiles, so memory stays
bounded on large scans, each tile's border blended into its neighbours (no seams), then resized
to the size asked for if that differs. The faces are restored and pasted at the output size.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .io import check_pixels, full_scale
from .text import printable
from .userfiles import read_regular, unreadable

TILE = 256  # input pixels per tile side: a 4x RRDBNet peaks at about 2.2 GB in fp32 (4.5 GB at 512)
OVERLAP = 16  # input pixels each tile shares with its neighbour, blended linearly
CONTEXT = 32  # input pixels around a tile that the model sees and whose output is dropped
DETAIL = 160  # characters of an exception's text in a message: enough for the first mismatch
MAX_BYTES = 2 << 30  # checked before reading: far above any single-image model (HAT-L is about 160 MB)
GRID = 16  # what the model sees starts on this grid, as the whole photo does: pixel unshuffle, attention windows


class UpsamplerError(ValueError):
    """A file that is not a usable super-resolution model; the message names the file and why."""


@dataclass(frozen=True)
class Upsampler:
    """A loaded super-resolution model (a spandrel ``ImageModelDescriptor``) and how it is tiled."""

    model: object
    name: str
    sha256: str = ""  # of the bytes it was loaded from
    tile: int = TILE
    overlap: int = OVERLAP
    context: int = CONTEXT

    @property
    def scale(self) -> int:
        return int(self.model.scale)

    def __call__(self, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``pixels`` (HxW or HxWx3, any dtype of :class:`~dmdnet_plugin.io.Picture`) upscaled by the
        model, then resized to ``size`` (width, height); the same dtype and layout. The model's own output
        is held whole (16 bytes a pixel), so it obeys the photos' pixel limit too: a 4x model on a photo
        restored at 1x would otherwise need 16 times the memory the output size suggests."""
        h, w = pixels.shape[:2]
        check_pixels(w * self.scale, h * self.scale, f"the {self.name} output ({self.scale}x)")
        top = full_scale(pixels.dtype)
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
        out = self.upscaled(rgb.astype(np.float32) / top)
        if out.shape[1::-1] != tuple(size):
            shrink = out.shape[1] > size[0]
            out = cv2.resize(out, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
        out = np.clip(out, 0, 1) * top
        out = out if pixels.dtype.kind == "f" else np.round(out)
        out = out.astype(pixels.dtype)
        return out if pixels.ndim == 3 else cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)

    def upscaled(self, rgb: np.ndarray) -> np.ndarray:
        """Float RGB in [0, 1] times the model's scale, tile by tile: the model sees ``context`` more
        pixels around each tile than it keeps, and each tile is feathered into the next."""
        h, w = rgb.shape[:2]
        s, step, c = self.scale, self.tile - self.overlap, self.context
        grid = math.lcm(GRID, self.model.size_requirements.multiple_of)
        out = np.zeros((h * s, w * s, 3), np.float32)
        weight = np.zeros((h * s, w * s, 1), np.float32)
        for y in range(0, max(h - self.overlap, 1), step):
            for x in range(0, max(w - self.overlap, 1), step):
                y1, x1 = min(y + self.tile, h), min(x + self.tile, w)
                cy, cx = max(y - c, 0) // grid * grid, max(x - c, 0) // grid * grid
                seen = self._model(rgb[cy : min(y1 + c, h), cx : min(x1 + c, w)])
                tile = seen[(y - cy) * s : (y1 - cy) * s, (x - cx) * s : (x1 - cx) * s]
                ramp = _ramp(y1 - y, x1 - x, self.overlap, (y > 0, x > 0, y1 < h, x1 < w), s)
                out[y * s : y1 * s, x * s : x1 * s] += tile * ramp
                weight[y * s : y1 * s, x * s : x1 * s] += ramp
        return out / np.maximum(weight, 1e-8)

    def _model(self, rgb: np.ndarray) -> np.ndarray:
        device, dtype = self.model.device, self.model.dtype
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device, dtype)
        with torch.inference_mode():
            y = self.model(x)
        return y[0].permute(1, 2, 0).float().cpu().numpy()


def _ramp(h: int, w: int, overlap: int, inner: tuple[bool, bool, bool, bool], scale: int) -> np.ndarray:
    """A tile's blending weight at the output scale: rising over ``overlap`` input pixels on each side
    that meets another tile (``inner``: top, left, bottom, right), 1 elsewhere."""

    def edge(n: int, start: bool, end: bool) -> np.ndarray:
        ramp = np.ones(n * scale, np.float32)
        width = min(overlap * scale, n * scale)
        rise = (np.arange(width, dtype=np.float32) + 0.5) / width
        if start and width:
            ramp[:width] = np.minimum(ramp[:width], rise)
        if end and width:
            ramp[-width:] = np.minimum(ramp[-width:], rise[::-1])
        return ramp

    top, left, bottom, right = inner
    return (edge(h, top, bottom)[:, None] * edge(w, left, right)[None, :])[..., None]


def load_upsampler(path: str | Path, device: str | torch.device = "cpu", sha256: str | None = None) -> Upsampler:
    """The super-resolution model in ``path`` on ``device``: the file read once, its sha256 taken from the
    same bytes that are loaded, and the model kept per content (a server or notebook that saves new
    weights over the same name gets them). ``sha256``: the content a run recorded; a file that no
    longer has it is refused (:meth:`RunSettings.background` never reads it while it is loaded)."""
    shown = printable(path)
    data = _read(Path(path), shown)
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise UpsamplerError(f"{shown}: changed since the run started (it was sha256 {sha256[:12]}...)")
    found = _cache(digest, str(device))
    if found is None:
        found = _cache(digest, str(device), _load(data, shown, Path(path).name, device, digest))
    return found


def loaded_upsampler(sha256: str, device: str | torch.device) -> Upsampler | None:
    """The model of this content on ``device``, when this process has it loaded."""
    return _cache(sha256, str(device))


_LOADED: OrderedDict[tuple[str, str], Upsampler] = OrderedDict()
_LOADED_LOCK = threading.Lock()  # a run's writer threads ask for it at once


def _cache(sha256: str, device: str, new: Upsampler | None = None) -> Upsampler | None:
    """The upsampler kept for (content, device), after storing ``new`` there; the 4 last used are kept."""
    with _LOADED_LOCK:
        key = (sha256, device)
        if new is not None:
            _LOADED[key] = new
        found = _LOADED.get(key)
        if found is not None:
            _LOADED.move_to_end(key)
        while len(_LOADED) > 4:
            _LOADED.popitem(last=False)
        return found


def _read(path: Path, shown: str) -> bytes:
    """The file's bytes, if it is a regular file of a model's size (a folder, a FIFO, a device or a huge
    file get one line)."""
    try:
        return read_regular(path, MAX_BYTES)
    except OSError as exc:
        raise UpsamplerError(f"{shown}: {unreadable(exc)}") from None


def _load(data: bytes, shown: str, name: str, device: str | torch.device, sha256: str) -> Upsampler:
    try:
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError, canonicalize_state_dict
    except ImportError:
        raise UpsamplerError(
            f'{shown}: a background upsampler needs spandrel: pip install "dmdnet-plugin[upscale]"'
        ) from None
    state = _state_dict(data, shown, name)
    try:
        model = ModelLoader(device).load_from_state_dict(canonicalize_state_dict(state))
    except UnsupportedModelError:
        raise UpsamplerError(f"{shown}: not a super-resolution model that spandrel knows") from None
    except Exception as exc:  # a known architecture with tensors that do not fit it: torch lists every one
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= DETAIL else detail[: DETAIL - 3] + "..."
        raise UpsamplerError(f"{shown}: a broken model file ({type(exc).__name__}: {printable(detail)})") from None
    if not isinstance(model, ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        kind = getattr(model, "purpose", type(model).__name__)
        raise UpsamplerError(f"{shown}: a {kind} model, not a super-resolution model (scale 2 or more)")
    if (model.input_channels, model.output_channels) != (3, 3):
        channels = f"{model.input_channels} channels in, {model.output_channels} out"
        raise UpsamplerError(f"{shown}: a model for {channels}; the background needs one for RGB (3 and 3)")
    if str(device).startswith("cuda") and model.supports_half:
        model = model.half()
    return Upsampler(model.eval(), name, sha256=sha256)


def _state_dict(data: bytes, shown: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (never unpickling code) or ``.safetensors`` file's bytes."""
    try:
        if name.lower().endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:
            with warnings.catch_warnings():  # torch warns about old pickle protocols: the line below says it all
                warnings.simplefilter("ignore")
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "safetensors file" if name.lower().endswith(".safetensors") else "PyTorch checkpoint of plain tensors"
        raise UpsamplerError(f"{shown}: not a readable model file (not a {kind}: {type(exc).__name__})") from None
    for key in ("params_ema", "params", "state_dict", "model"):  # Real-ESRGAN, BasicSR, Lightning files
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpsamplerError(f"{shown}: holds no model weights")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
