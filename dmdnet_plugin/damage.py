"""Fixed damage for references, so that a damaged face can be compared with its person's photos damaged alike.

Heavy blur and downsampling move a face's dlib embedding away from the same person's clean
photos (severely damaged faces lie 0.5-0.6 from their own person's mean, where strangers start),
but towards the same photos damaged the same way. An identity therefore also keeps the mean
embedding of its references under :data:`DAMAGES`, and :mod:`matching` compares a face the clean
references could not decide with it (docs/identity.md).
"""

from __future__ import annotations

import cv2
import numpy as np

from .components import CROP_SIZE
from .faces import FaceBackend
from .io import to_uint8

# (blur sigma, downscale factor, Gaussian noise in 8-bit levels, JPEG quality), on the 512 px crop:
# the kinds of damage under which clean references stop matching (benchmarks/identity_matching.py)
DAMAGES = ((4.0, 6, 15, 50), (6.0, 8, 20, 40), (8.0, 8, 20, 40))


def damage(crop: np.ndarray, sigma: float, down: int, noise: float, quality: int, seed: int = 0) -> np.ndarray:
    """Blurred, downscaled, noisy, JPEG-compressed and scaled back up: float RGB crop in, uint8 RGB out."""
    small = CROP_SIZE // down
    img = cv2.resize(cv2.GaussianBlur(crop, (0, 0), sigma), (small, small), interpolation=cv2.INTER_LINEAR)
    img = img + np.random.default_rng(seed).normal(0.0, noise / 255, img.shape).astype(np.float32)
    _, buf = cv2.imencode(".jpg", to_uint8(np.clip(img, 0, 1))[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return np.ascontiguousarray(cv2.resize(img, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR))


def damaged_embedding(backend: FaceBackend, crop: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Mean embedding of an aligned reference under every damage of :data:`DAMAGES`.

    The landmarks are the clean crop's: on a damaged face the predictor is less sure, and the
    reference's geometry is known.
    """
    return np.mean([backend.embed(damage(crop, *d), landmarks) for d in DAMAGES], axis=0)
