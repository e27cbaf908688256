"""Reading and writing photos without losing what the user's file had.

Photos come as 8- or 16-bit, gray, RGB, RGBA, CMYK JPEGs, EXIF-rotated phone pictures. The
pipeline works on float RGB; :class:`Picture` keeps the original pixels and what
:func:`write_image` needs to give the output the same bit depth, alpha and grayness.
Every failure is an :class:`ImageError` whose message names the file and the problem.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from PIL.TiffImagePlugin import TILELENGTH, TILEWIDTH

from .atomic import atomic_path
from .userfiles import read_regular, unreadable

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")  # Pillow's names; JPEG includes the MPO files of phones
MAX_PIXELS = 120_000_000  # a 12000x10000 photo; larger ones are refused, not swapped to death
MIN_SIDE = 8
MAX_FILE_BYTES = 2 << 30  # MAX_PIXELS of float RGBA, uncompressed, with room to spare; checked before reading


def full_scale(dtype: np.dtype) -> float:
    """The value that means full intensity for pixels of this dtype (float images are 0..1)."""
    return 1.0 if np.dtype(dtype).kind == "f" else float(np.iinfo(dtype).max)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] as uint8, for detectors, browsers and PNG face crops."""
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


class ImageError(ValueError):
    """An input that cannot be used as a photo."""


def check_pixels(width: int, height: int, name: str) -> None:
    """The one size rule for every picture, photo or video frame, on every surface: refuse one larger
    than :data:`MAX_PIXELS` (checked from a header, before decoding) or smaller than :data:`MIN_SIDE`."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: image is {width}x{height} pixels, more than the limit of {MAX_PIXELS}")
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: image is {width}x{height} pixels, too small to hold a face")


@dataclass(frozen=True)
class Picture:
    """A photo: ``pixels`` exactly as stored (HxW or HxWx3, RGB order), uint8, uint16, or float32
    in [0, 1] (images handed over by ComfyUI or Gradio). Frozen: the pipeline never changes an input."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None

    @property
    def gray(self) -> bool:
        return self.pixels.ndim == 2

    @property
    def max_value(self) -> float:
        return full_scale(self.pixels.dtype)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    def rgb(self) -> np.ndarray:
        """Float32 RGB in [0, 1], HxWx3."""
        rgb = self.pixels if not self.gray else np.repeat(self.pixels[..., None], 3, axis=2)
        return rgb.astype(np.float32) / self.max_value

    def rgb8(self) -> np.ndarray:
        """uint8 RGB, for detectors."""
        if self.pixels.dtype == np.uint8 and not self.gray:
            return self.pixels
        return to_uint8(self.rgb())


def refuse_overwrite(src: Path, dst: Path) -> None:
    """Inputs are never modified: an output path that is the input itself is an error for that file."""
    if os.path.realpath(dst) == os.path.realpath(src):  # Path.resolve raises on a link loop
        raise ImageError(f"{src}: the output would overwrite the input; choose another output folder (-o)")


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxW(xC) array."""
    ops = {
        2: [np.fliplr],
        3: [lambda a: np.rot90(a, 2)],
        4: [np.flipud],
        5: [lambda a: np.rot90(a, -1), np.fliplr],
        6: [lambda a: np.rot90(a, -1)],
        7: [lambda a: np.rot90(a, 1), np.fliplr],
        8: [lambda a: np.rot90(a, 1)],
    }
    for op in ops.get(orientation, []):
        arr = op(arr)
    return np.ascontiguousarray(arr)


def _decode_16bit(
    data: bytes, name: str, size: tuple[int, int], orientation: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """16-bit files through OpenCV, which (unlike Pillow) keeps 16-bit colour. OpenCV reads the header
    itself: pixels of another ``size`` than the one checked mean a header that says two things."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageError(f"{name}: cannot decode 16-bit image")
    if (arr.shape[1], arr.shape[0]) != size:
        raise ImageError(
            f"{name}: corrupt image (its header gives both {size[0]}x{size[1]} and {arr.shape[1]}x{arr.shape[0]})"
        )
    alpha = None
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            alpha = arr[..., 3]
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB)
    return _orient(arr, orientation), None if alpha is None else _orient(alpha, orientation)


def _is_16bit(data: bytes, im: Image.Image) -> bool:
    """Pillow silently reduces 16-bit RGB PNG/TIFF to 8 bits, so look at the header itself."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return True
    if im.format == "PNG":
        return len(data) > 24 and data[24] == 16  # IHDR bit depth
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return 16 in (bits if isinstance(bits, tuple) else (bits,))
    return False


def _open(data: bytes) -> ImageFile.ImageFile:
    """The file as Pillow's reader of its format sees it after reading the header, and nothing more.
    Not ``Image.open``: its decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, a setting of the whole
    process, which may be ComfyUI's) only warns up to twice the limit; here :func:`check_pixels` is the
    rule. Only :data:`FORMATS`, whose header bounds what their decoder allocates: Pillow decodes an ICO's
    largest embedded PNG, of any size, while opening it."""
    Image.init()
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept(data[:16]) is True:  # a string means "recognised, but this Pillow cannot read it"
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open calls unidentified
                break
    raise UnidentifiedImageError


def _check_header(im: ImageFile.ImageFile, name: str) -> None:
    """:func:`check_pixels` on the header's size. A TIFF decoder also holds one whole tile, and a tile may
    be larger than the image: a 64x64 TIFF can claim 60000x60000 tiles, and then costs as much as an
    image of that size."""
    check_pixels(*im.size, name)
    if im.format == "TIFF" and TILEWIDTH in im.tag_v2:
        tile = im.tag_v2[TILEWIDTH], im.tag_v2.get(TILELENGTH, 0)
        check_pixels(max(im.width, tile[0]), max(im.height, tile[1]), f"{name} (in tiles of {tile[0]}x{tile[1]})")


def decode_image(data: bytes, name: str = "<image>") -> Picture:
    """Decode an encoded photo; ``name`` is used in error messages. The size is checked from the header
    before anything is decoded (even reading a PNG's EXIF decodes it)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with _open(data) as im:
            _check_header(im, name)
            orientation = im.getexif().get(0x0112, 1)
            if _is_16bit(data, im):
                im.load()  # Pillow's decoder refuses data that disagrees with the header Pillow read
                pixels, alpha = _decode_16bit(data, name, im.size, orientation)
            else:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("P", "PA"):
                    im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
                if im.mode in ("L", "LA"):
                    arr = np.asarray(im.convert("LA"))
                    pixels, alpha = arr[..., 0].copy(), arr[..., 1].copy() if im.mode == "LA" else None
                elif im.mode in ("RGBA", "RGBa"):
                    arr = np.asarray(im.convert("RGBA"))
                    pixels, alpha = arr[..., :3].copy(), arr[..., 3].copy()
                else:  # RGB, CMYK, YCbCr, 1, F...
                    pixels, alpha = np.asarray(im.convert("RGB")).copy(), None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (PNG, JPEG, WebP, TIFF or BMP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None
    return Picture(pixels, alpha)


def read_image(path: str | Path) -> Picture:
    return decode_image(read_image_file(path), str(path))


def read_image_file(path: str | Path) -> bytes:
    """A photo file's bytes, from a regular file of at most :data:`MAX_FILE_BYTES` (see :mod:`.userfiles`)."""
    try:
        return read_regular(path, MAX_FILE_BYTES)
    except OSError as exc:
        raise ImageError(f"{path}: {unreadable(exc)}") from None


def encode_image(pixels: np.ndarray, alpha: np.ndarray | None, suffix: str) -> bytes:
    """Encode native pixels (RGB order) for a file with ``suffix``; JPEG drops alpha."""
    arr = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    suffix = suffix.lower()
    if alpha is not None and suffix in (".png", ".webp", ".tif", ".tiff"):
        if arr.ndim == 2:
            arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
        arr = np.dstack([arr, alpha.astype(arr.dtype)])
    if suffix in (".jpg", ".jpeg", ".webp") and arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)  # these formats are 8-bit only
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(suffix, arr, params)
    if not ok:
        raise ImageError(f"cannot encode image as {suffix}")
    return buf.tobytes()


ImageWriter = Callable[[Path, np.ndarray, "np.ndarray | None"], object]  # write_image, or a cluster's filesystem


def write_image(path: str | Path, pixels: np.ndarray, alpha: np.ndarray | None = None) -> Path:
    """Write native pixels atomically: a reader never sees a partial file."""
    path = Path(path)
    data = encode_image(pixels, alpha, path.suffix)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def list_images(inputs: list[str | Path], extensions: set[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Files given directly, plus the files with these extensions found (sorted, recursively) in given folders."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        else:
            found.append(item)
    return found
