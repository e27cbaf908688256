"""Folders of real photos (and a broken file) for the runs of the photo stream and of Ray."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dmdnet_plugin.cli"]  # the command line in its own process
PHOTOS = [
    ROOT / "examples" / "photos" / "family.jpg",
    ROOT / "examples" / "photos" / "obama_lowres.jpg",
    DATA / "photos" / "family.jpg",
    DATA / "celebref" / "00005" / "3.jpg",
    DATA / "lq" / "00022_14.jpg",
]


def folder(tmp_path: Path, copies: int = 1) -> Path:
    """Real photos (and a broken file), each ``copies`` times under its own name."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(copies):
        for i, photo in enumerate(PHOTOS):
            shutil.copy(photo, inputs / f"{k:02d}_{i}_{photo.name}")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return inputs


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def report(path: Path) -> list[dict]:
    return [{**e, "output": e["output"] and Path(e["output"]).name} for e in json.loads(path.read_text())["files"]]


def restore_args(inputs: str | Path, out: Path, rep: Path, weights: Path, *extra: str) -> list[str]:
    """``dmdnet restore`` of a folder with a report (for :func:`dmdnet_plugin.cli.main`, or after CLI)."""
    return ["restore", str(inputs), "-o", str(out), "--weights", str(weights), "--report", str(rep), *extra]
