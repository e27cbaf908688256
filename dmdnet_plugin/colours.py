"""Keep the photo's own colours: a restored face takes its fine detail from the model and its
broad colour from the input.

Blur, noise and JPEG leave a face's broad colour intact, but a small model drifts (the bundled
demo turns red lips orange and a green background grey: docs/training_demo.md). StableSR's colour
fix does the same with a wavelet split; a Gaussian one is enough here. On the held-out faces it
raised the demo checkpoint's PSNR by 0.35 dB (docs/weights.md).
"""

from __future__ import annotations

import cv2
import numpy as np

SHRINK = 2  # the low-pass is computed at 1/SHRINK of the size: 4 was off by up to 3 levels (low_pass)
SIGMA = 16.0  # px on the 512 px crop: coarser than any facial detail, finer than a face's colour regions


def low_pass(img: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """A Gaussian blur of ``sigma`` px, computed at 1/SHRINK of the size: what is left after a blur this
    wide is smooth enough to shrink and grow back. Within one 8-bit level of the full-size blur on
    real face crops restored by the demo model (tests/test_pipeline.py), and about 4x faster."""
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // SHRINK), max(1, h // SHRINK)), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), sigma / SHRINK), (w, h), interpolation=cv2.INTER_LINEAR)


def keep_colours(restored: np.ndarray, original: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """``restored`` with its coarse colour (Gaussian low-pass) replaced by ``original``'s; float RGB in [0, 1]."""
    return np.clip(restored - low_pass(restored, sigma) + low_pass(original, sigma), 0.0, 1.0).astype(np.float32)
