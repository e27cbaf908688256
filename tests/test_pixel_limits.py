"""The pixel limit (:func:`dmdnet_plugin.io.check_pixels`) holds for the size a file's header claims,
before anything is decoded.

The hostile files are made the way an attacker makes them: a PNG or TIFF of a few hundred kilobytes of
deflated zeros that decodes to 11000x11000 pixels (121 megapixels: over the limit, but under twice it,
where Pillow's own check only warns), or a small real JPEG, WebP or BMP whose size fields are rewritten.
They are all read by one fresh process that reports, for each file, how much its peak memory grew, so
that any decoding shows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA
from PIL import Image, ImageOps

import dmdnet_plugin
from dmdnet_plugin import cli
from dmdnet_plugin.io import MAX_PIXELS, read_image

BIG = 11000  # 121 megapixels
DECODED = BIG * BIG  # bytes of its smallest decoding: one 8-bit channel
PHOTOS = [DATA / "photos" / "family.jpg", *sorted((DATA.parents[1] / "examples" / "photos").glob("*.jpg"))]

# Run in a fresh process: reads each file given and prints one JSON line per file.
READER = """
import hashlib, json, resource, sys, warnings
from dmdnet_plugin.io import ImageError, read_image

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux

for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the present size
    before = peak()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            picture = read_image(path)
            outcome = f"{picture.size[0]}x{picture.size[1]} {hashlib.sha1(picture.pixels).hexdigest()}"
        except ImageError as exc:
            outcome = str(exc)
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"outcome": outcome, "growth": peak() - before, "warnings": [str(w.message) for w in caught]}))
"""


def _zeros(size: int, block: int = 1 << 20) -> Iterator[bytes]:
    """``size`` zero bytes, a block at a time: the data of a black image, never held whole."""
    for start in range(0, size, block):
        yield bytes(min(block, size - start))


def _deflate(parts: Iterable[bytes]) -> bytes:
    z = zlib.compressobj(9)
    return b"".join(z.compress(part) for part in parts) + z.flush()


def _png(width: int, height: int, idat: bytes, depth: int = 8, color: int = 0, exif: bytes = b"") -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` and whose image data is ``idat``, whatever it holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    extra = chunk(b"eXIf", exif) if exif else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _black_png(width: int, height: int) -> bytes:
    return _png(width, height, _deflate(_zeros((1 + width) * height)))


def _tiff(*pages: tuple[list[tuple[int, int | tuple[int, ...]]], bytes]) -> bytes:
    """A little-endian TIFF made by hand: each page is its tags (tag, value) in the order given, even
    twice, and one strip (or, with a TileWidth tag, one tile) of data, whose offset and size are added."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    link = 4  # where the offset of the next page goes
    for tags, data in pages:
        at = len(out)
        out += data + b"\x00" * (len(data) % 2)
        offsets, counts = (324, 325) if any(tag == 322 for tag, _ in tags) else (273, 279)
        fields = []
        for tag, value in sorted([*tags, (offsets, at), (counts, len(data))], key=lambda field: field[0]):
            values = value if isinstance(value, tuple) else (value,)
            long = tag in (offsets, counts) or max(values) > 0xFFFF
            raw = struct.pack(f"<{len(values)}{'I' if long else 'H'}", *values)
            if len(raw) > 4:  # stored apart, the field holds its offset
                out += raw
                raw = struct.pack("<I", len(out) - len(raw))
            fields.append(struct.pack("<HHI", tag, 4 if long else 3, len(values)) + raw.ljust(4, b"\x00"))
        out[link : link + 4] = struct.pack("<I", len(out))
        out += struct.pack("<H", len(fields)) + b"".join(fields)
        link = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def _gray_tiff(width: int, height: int, data: bytes, *more: tuple[int, int]) -> tuple[list, bytes]:
    """A page of 8-bit gray, deflated, in one strip."""
    return [(256, width), (257, height), (258, 8), (259, 8), (262, 1), (277, 1), *more], data


def _rgb16_tiff(widths: tuple[int, ...], height: int, data: bytes, compression: int) -> bytes:
    """16-bit RGB with an ImageWidth tag for each of ``widths``: Pillow keeps the last, libtiff the first."""
    tags = [(256, width) for width in widths]
    return _tiff((tags + [(257, height), (258, (16, 16, 16)), (259, compression), (262, 2), (277, 3)], data))


def _family() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(PHOTOS[0])), cv2.COLOR_BGR2RGB)


def _encoded(suffix: str) -> bytes:
    return cv2.imencode(suffix, cv2.imread(str(PHOTOS[0])))[1].tobytes()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame says ``width`` x ``height``."""
    data = _encoded(".jpg")
    at = 2
    while data[at + 1] != 0xC0:  # walk the marker segments to the baseline start-of-frame
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def _webp_claiming(width: int, height: int) -> bytes:
    """A real lossy WebP whose VP8 frame header says ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.fromarray(_family()).save(buffer, "WEBP", quality=80)
    data = buffer.getvalue()
    assert data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a"
    return data[:26] + struct.pack("<HH", width, height) + data[30:]


def _bmp_claiming(width: int, height: int) -> bytes:
    data = _encoded(".bmp")
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def _limit_photo() -> tuple[bytes, np.ndarray]:
    """A gray PNG of exactly :data:`MAX_PIXELS`, stored 10000x12000 and EXIF-tagged "rotate 90 clockwise",
    with the upright pixels it must load as."""
    width, height = 10000, 12000
    assert width * height == MAX_PIXELS
    exif = Image.Exif()
    exif[0x0112] = 6
    rows = (bytes([0]) + bytes([y % 256]) * width for y in range(height))
    upright = np.broadcast_to((np.arange(height - 1, -1, -1) % 256).astype(np.uint8), (width, height))
    return _png(width, height, _deflate(rows), exif=exif.tobytes()[6:]), upright  # eXIf: no "Exif\0\0"


def _loaded(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]} {hashlib.sha1(np.ascontiguousarray(pixels)).hexdigest()}"


def _over(name: str | Path, width: int = BIG, height: int = BIG) -> str:
    return f"{name}: image is {width}x{height} pixels, more than the limit of {MAX_PIXELS}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pixel_limits")


@pytest.fixture(scope="module")
def expected(folder) -> dict[str, str]:
    """Each file made, with the outcome of reading it: its one-line error, or the size and pixels it loads as."""
    zeros_64 = np.zeros((64, 64), np.uint8)
    limit, upright = _limit_photo()
    tiles = _gray_tiff(64, 64, _deflate(_zeros(12000 * 12000)), (322, 12000), (323, 12000))
    family = _family()
    height, width = family.shape[:2]
    first_page = ([(256, width), (257, height), (258, (8, 8, 8)), (259, 1), (262, 2), (277, 3)], family.tobytes())
    black = _deflate(_zeros(DECODED))
    files = {
        "over.png": (_black_png(BIG, BIG), _over(folder / "over.png")),
        "over.tif": (_tiff(_gray_tiff(BIG, BIG, black)), _over(folder / "over.tif")),
        "over.jpg": (_jpeg_claiming(BIG, BIG), _over(folder / "over.jpg")),
        "over.webp": (_webp_claiming(BIG, BIG), _over(folder / "over.webp")),
        "over.bmp": (_bmp_claiming(BIG, BIG), _over(folder / "over.bmp")),
        "over_twice.jpg": (_jpeg_claiming(16000, 16000), _over(folder / "over_twice.jpg", 16000, 16000)),
        "one_row_over.png": (_black_png(10000, 12001), _over(folder / "one_row_over.png", 10000, 12001)),
        "limit.png": (limit, _loaded(upright)),
        "tiles.tif": (_tiff(tiles), _over(f"{folder / 'tiles.tif'} (in tiles of 12000x12000)", 12000, 12000)),
        "pages.tif": (_tiff(first_page, _gray_tiff(BIG, BIG, black)), _loaded(family)),
        "more_data.png": (_png(64, 64, _deflate(_zeros(65 * 2_000_000))), _loaded(zeros_64)),
        "more_data16.png": (
            _png(64, 64, _deflate(_zeros(385 * 400_000)), depth=16, color=2),
            _loaded(np.zeros((64, 64, 3), np.uint16)),
        ),
        "two_widths16.tif": (
            _rgb16_tiff((128, 64), 64, bytes(128 * 64 * 6), compression=1),
            f"{folder / 'two_widths16.tif'}: corrupt image (its header gives both 64x64 and 128x64)",
        ),
        "two_widths16_deflated.tif": (
            _rgb16_tiff((6000, 64), 6000, _deflate(_zeros(6000 * 6000 * 6)), compression=8),
            f"{folder / 'two_widths16_deflated.tif'}: truncated or corrupt image (decoder error -2)",
        ),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}


@pytest.fixture(scope="module")
def read(folder, expected) -> dict[str, dict]:
    """What a fresh process saw reading each file: the outcome, its peak memory growth and any warnings.
    Large allocations are always mapped anew and returned on free, so one file's memory cannot hide the
    next one's."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak memory is reset through Linux's /proc")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(dmdnet_plugin.__file__).parents[1]),  # the package under test
        "MALLOC_MMAP_THRESHOLD_": str(1 << 17),
    }
    names = list(expected)
    run = subprocess.run(
        [sys.executable, "-c", READER, *(str(folder / name) for name in names)],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,  # not the checkout: `-c` puts the working folder first on the path
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return dict(zip(names, map(json.loads, run.stdout.splitlines()), strict=True))


@pytest.mark.parametrize(
    "name", ["over.png", "over.tif", "over.jpg", "over.webp", "over.bmp", "over_twice.jpg", "one_row_over.png"]
)
def test_a_photo_over_the_limit_is_refused_from_its_header(read, expected, name):
    assert read[name]["outcome"] == expected[name]
    assert read[name]["growth"] < DECODED / 4  # nothing was decoded
    assert read[name]["warnings"] == []  # the one line is all


def test_a_photo_of_exactly_the_limit_loads_upright(read, expected):
    assert read["limit.png"]["outcome"] == expected["limit.png"]


def test_tiff_tiles_larger_than_the_limit_are_refused(read, expected):
    """A decoder holds a whole tile at once, however small the image: 64x64 in 12000x12000 tiles."""
    assert read["tiles.tif"]["outcome"] == expected["tiles.tif"]
    assert read["tiles.tif"]["growth"] < 12000 * 12000 / 4


def test_only_the_first_page_is_decoded(read, expected):
    """A TIFF whose second page is 11000x11000: the first page loads, the second is never decoded."""
    assert read["pages.tif"]["outcome"] == expected["pages.tif"]
    assert read["pages.tif"]["growth"] < DECODED / 4


@pytest.mark.parametrize("name", ["more_data.png", "more_data16.png"])
def test_data_beyond_the_claimed_size_is_not_decoded(read, expected, name):
    """A 64x64 PNG followed by 130 (8-bit) or 154 MB (16-bit) of compressed rows loads as its 64x64."""
    assert read[name]["outcome"] == expected[name]
    assert read[name]["growth"] < 16 << 20


@pytest.mark.parametrize("name", ["two_widths16.tif", "two_widths16_deflated.tif"])
def test_a_16bit_tiff_with_two_widths_is_refused(read, expected, name):
    """OpenCV decodes 16-bit files and reads the header itself: it must not decode another size than
    the one checked (6000x6000 here, 216 MB, when Pillow's reading says 64x6000)."""
    assert read[name]["outcome"] == expected[name]
    assert read[name]["growth"] < 6000 * 6000 * 6 / 4


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda path: path.name)
def test_ordinary_photos_load_as_pillow_decodes_them(photo):
    with Image.open(photo) as im:
        assert np.array_equal(read_image(photo).pixels, np.asarray(ImageOps.exif_transpose(im).convert("RGB")))


def test_the_cli_gives_one_error_line_and_goes_on(tmp_path, small_weights, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    big = inputs / "big.png"
    big.write_bytes(_black_png(BIG, BIG))
    good = Path(shutil.copy(PHOTOS[-1], inputs))
    code = cli.main(["restore", str(big), str(good), "-o", str(tmp_path / "out"), "--weights", str(small_weights)])
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {_over(big)}"]
    assert code == 1 and "Traceback" not in err
    assert (tmp_path / "out" / good.name).exists()
    assert not (tmp_path / "out" / big.name).exists()
