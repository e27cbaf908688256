"""Make a paired test set for ``test.py``: ``python basicsr_arch/make_pairs.py SRC OUT [--faces PERSON/NAME ...]``.

Each aligned face of SRC (``<person>/*`` folders, or one plain folder, as ``DMDNetFaceDataset``
reads them) is degraded as validation degrades it: with the degradation options of an option
file's ``datasets.val`` (by default ``options/dmdnet_demo.yml``'s fixed moderate one) and the
face's index in SRC as the seed, so a face's copy is the same whichever others are made. The
copy goes to ``OUT/<its path>.png`` with its 68 landmarks beside it (``NAME.png.txt``). The
ground truth and the references stay in SRC: a test option file points ``dataroot_gt`` and
``dataroot_refs`` there, as ``options/test_dmdnet.yml`` does for ``tests/data/heldout_lq``.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
from pathlib import Path

import cv2
import numpy as np
import yaml
from basicsr.utils import tensor2img
from PIL import Image

sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))  # run from a checkout

from basicsr_arch import ROOT  # noqa: E402
from basicsr_arch.dmdnet_dataset import DMDNetFaceDataset  # noqa: E402
from basicsr_arch.option_checks import OptionError  # noqa: E402
from dmdnet_plugin.atomic import atomic_path  # noqa: E402
from dmdnet_plugin.components import CROP_SIZE  # noqa: E402
from dmdnet_plugin.faces import landmark_path, read_landmarks, write_landmarks  # noqa: E402
from dmdnet_plugin.text import printable  # noqa: E402

# What degrades the low-quality face only; flips, warps and gray would change the ground truth too.
DEGRADATION_KEYS = (
    "blur_kernel_size",
    "kernel_list",
    "kernel_prob",
    "blur_sigma",
    "downsample_range",
    "noise_range",
    "jpeg_range",
    "color_jitter_prob",
    "color_jitter_shift",
)


def degradation(opt_file: Path) -> dict:
    """The degradation options of ``datasets.val`` in an option file, without its folders."""
    val = ((yaml.safe_load(opt_file.read_text()) or {}).get("datasets") or {}).get("val")
    if not isinstance(val, dict):
        raise OptionError(f"{printable(opt_file)}: no datasets.val section to take the degradation from")
    return {key: val[key] for key in DEGRADATION_KEYS if key in val}


def _write_landmarks(image: Path, marks: Path, out: Path) -> None:
    """The source's landmarks in the 512 px copy's pixels (the dataset resizes other sizes)."""
    with Image.open(image) as im:
        width, height = im.size
    write_landmarks(landmark_path(out), read_landmarks(marks) * [CROP_SIZE / width, CROP_SIZE / height])


def _write_png(path: Path, bgr: np.ndarray) -> Path:
    """Lossless at zlib's highest level: a shipped test set stays small (218 KB a face, not 320)."""
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"{printable(path)}: cannot encode PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return path


def make_pairs(src: Path, out: Path, degradation: dict, faces: list[str] | None = None) -> list[Path]:
    """Write the low-quality copy (and landmarks) of each face of ``src``, or of those named
    ``PERSON/NAME`` in ``faces``, under ``out``; returns the images written."""
    if not src.is_dir():
        raise OptionError(f"{printable(src)}: not a folder")
    if out.resolve().is_relative_to(src.resolve()):
        raise OptionError(f"{printable(out)}: inside {printable(src)}, where the copies would be read as faces")
    dataset = DMDNetFaceDataset(
        {
            "name": "pairs",
            "phase": "val",
            "dataroot_gt": str(src),
            "num_refs": 0,
            "use_hflip": False,
            "deterministic": True,
            **degradation,
        }
    )
    names = [image.relative_to(src).with_suffix("").as_posix() for image, _, _ in dataset.samples]
    unknown = sorted(set(faces or []) - set(names))
    if unknown:
        raise OptionError(f"{printable(src)}: no face {printable(', '.join(unknown))}")
    written = []
    for index, name in enumerate(names):
        if faces and name not in faces:
            continue
        written.append(_write_png(out / f"{name}.png", tensor2img(dataset[index]["lq"], min_max=(-1, 1))))
        image, _, marks = dataset.samples[index]
        if marks.is_file():
            _write_landmarks(image, marks, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("src", type=Path, help="aligned faces: <person>/* folders or one plain folder")
    parser.add_argument("out", type=Path, help="folder for the low-quality copies (same relative paths, .png)")
    parser.add_argument("--faces", nargs="+", metavar="PERSON/NAME", help="only these faces (default: all)")
    parser.add_argument(
        "--opt",
        type=Path,
        default=ROOT / "options" / "dmdnet_demo.yml",
        help="option file whose datasets.val degradation to use (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        written = make_pairs(args.src, args.out, degradation(args.opt), args.faces)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # OptionError is a ValueError
        sys.exit(f"error: {printable(exc)}")
    print(f"{len(written)} low-quality faces written to {printable(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
