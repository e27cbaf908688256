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

SIGMA = 16.0  # px on the 512 px crop: coarser than any facial detail, finer than a face's colour regions


def keep_colours(restored: np.ndarray, original: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """``restored`` with its coarse colour (Gaussian low-pass) replaced by ``original``'s; float RGB in [0, 1]."""

    def low(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (0, 0), sigma)

    return np.clip(restored - low(restored) + low(original), 0.0, 1.0).astype(np.float32)
