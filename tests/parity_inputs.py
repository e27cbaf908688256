"""The real faces and boxes that the parity data was computed on (tests/data/SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from dmdnet_plugin import boxes_from_landmarks

DATA = Path(__file__).parent / "data"
LQ = ["lq/00005_17.jpg", "lq/00022_14.jpg"]
LQ_LANDMARKS = ["celebref/00005/0.jpg.txt", "celebref/00022/0.jpg.txt"]  # two different box sets
REFS = ["celebref/00005/1.jpg", "celebref/00005/2.jpg", "celebref/00005/3.jpg"]


def read_face(path: Path) -> torch.Tensor:
    """512x512 face as (3, 512, 512) RGB in [-1, 1], as the authors' script reads it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1) * 2 - 1


def boxes_from_file(path: Path) -> np.ndarray:
    return boxes_from_landmarks(np.loadtxt(path))


def load_parity_inputs() -> dict[str, torch.Tensor]:
    return {
        "lq": torch.stack([read_face(DATA / p) for p in LQ]),
        "lq_boxes": torch.from_numpy(np.stack([boxes_from_file(DATA / p) for p in LQ_LANDMARKS])),
        "refs": torch.stack([read_face(DATA / p) for p in REFS]),
        "ref_boxes": torch.from_numpy(np.stack([boxes_from_file(DATA / (p + ".txt")) for p in REFS])),
    }
