"""Alignment to the 512x512 face template, component boxes, and paste-back.

DMDNet was trained on FFHQ-style crops (the authors' CelebRef crops put the eyes, nose and
mouth within 2 px of the standard FFHQ 5-point template). A similarity transform from five
points of the 68 landmarks maps each face there. The paste-back warps the restored crop
and a feathered mask back with the inverse transform and only writes pixels under the mask,
so everything away from the faces keeps its exact original values.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .components import CROP_SIZE, boxes_from_landmarks
from .io import full_scale

FFHQ_5 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
# Mean 68 landmarks of the authors' aligned CelebRef references (dmdnet_plugin/data/template68.txt).
TEMPLATE_68 = np.loadtxt(Path(__file__).parent / "data" / "template68.txt")
TEMPLATE_BOXES = boxes_from_landmarks(TEMPLATE_68)
PLAUSIBLE_PX = 40.0  # landmarks whose 5 key points stray further on average are not trusted
FEATHER_PX = 48  # width of the mask's soft edge, in crop pixels


def five_points(landmarks68: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners, the points of the FFHQ template."""
    lm = np.asarray(landmarks68, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def alignment_matrix(landmarks68: np.ndarray) -> np.ndarray:
    """2x3 similarity transform from image pixels to the 512x512 template."""
    matrix, _ = cv2.estimateAffinePartial2D(five_points(landmarks68), FFHQ_5, method=cv2.LMEDS)
    if matrix is None:
        matrix, _ = cv2.estimateAffinePartial2D(five_points(landmarks68), FFHQ_5)
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]


def matrix_scale(matrix: np.ndarray) -> float:
    """How much a similarity transform enlarges (above 1) or shrinks an image."""
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def warp_face(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The 512x512 aligned crop. Faces much larger than the crop are first shrunk by area
    averaging, so that the bilinear warp does not alias."""
    scale = matrix_scale(matrix)
    shrink = int(1 / scale) if scale < 0.5 else 1
    if shrink > 1:
        h, w = rgb.shape[:2]
        rgb = cv2.resize(rgb, (max(1, w // shrink), max(1, h // shrink)), interpolation=cv2.INTER_AREA)
        matrix = matrix.copy()
        matrix[:, :2] *= shrink
    return cv2.warpAffine(
        rgb, matrix, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def plausible(landmarks_crop: np.ndarray | None) -> bool:
    """Landmarks in crop pixels that sit where an aligned face's features are."""
    if landmarks_crop is None or not np.isfinite(landmarks_crop).all():
        return False
    inside = (landmarks_crop >= 0).all() and (landmarks_crop < CROP_SIZE).all()
    stray = np.linalg.norm(five_points(landmarks_crop) - FFHQ_5, axis=1).mean()
    return bool(inside and stray < PLAUSIBLE_PX)


def component_boxes(landmarks_crop: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Boxes from trustworthy landmarks, else the template's; and which one was used."""
    if plausible(landmarks_crop):
        return boxes_from_landmarks(landmarks_crop), "landmarks"
    return TEMPLATE_BOXES.copy(), "template"


def _feather_mask() -> np.ndarray:
    """1 in the middle of the crop, falling smoothly to 0 at its edge."""
    ramp = np.minimum(np.arange(CROP_SIZE), np.arange(CROP_SIZE)[::-1]).astype(np.float32)
    ramp = np.clip((ramp - 4) / FEATHER_PX, 0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible seam
    return np.minimum(ramp[:, None], ramp[None, :])


CROP_MASK = _feather_mask()


def face_mask(height: int, width: int, matrix: np.ndarray) -> np.ndarray:
    """How strongly :func:`paste_face` blends this face into each pixel of an image that size."""
    return cv2.warpAffine(
        CROP_MASK, cv2.invertAffineTransform(matrix), (width, height), flags=cv2.INTER_LINEAR, borderValue=0
    )


def face_region(
    canvas: np.ndarray, crop: np.ndarray, matrix: np.ndarray, strength: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The rectangle of ``canvas`` that a 512x512 float RGB ``crop`` lands on through the inverse of
    ``matrix`` (a view), the crop warped onto it, and the blend weight of each of its pixels
    (grey canvases get a grey face); None when the crop lands outside."""
    inverse = cv2.invertAffineTransform(matrix)
    corners = transform_points(np.array([[0, 0], [CROP_SIZE, 0], [0, CROP_SIZE], [CROP_SIZE, CROP_SIZE]]), inverse)
    h, w = canvas.shape[:2]
    x0, y0 = np.floor(corners.min(0)).astype(int).clip(0, [w, h])
    x1, y1 = np.ceil(corners.max(0)).astype(int).clip(0, [w, h])
    if x1 <= x0 or y1 <= y0:
        return None
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    size = (int(x1 - x0), int(y1 - y0))
    face = cv2.warpAffine(crop.astype(np.float32), local, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mask = cv2.warpAffine(CROP_MASK, local, size, flags=cv2.INTER_LINEAR, borderValue=0) * float(strength)
    if canvas.ndim == 2:
        face = face @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return canvas[y0:y1, x0:x1], face, mask


def paste_face(canvas: np.ndarray, crop: np.ndarray, matrix: np.ndarray, strength: float = 1.0) -> None:
    """Blend a 512x512 float RGB ``crop`` into ``canvas`` in place, through the inverse of ``matrix``.

    ``canvas`` is the native image (HxW or HxWx3, uint8/uint16/float). ``matrix`` maps canvas
    pixels to crop pixels. Pixels the mask does not reach keep their values.
    """
    found = face_region(canvas, crop, matrix, strength)
    if found is None:
        return
    region, face, mask = found
    if canvas.ndim == 3:
        mask = mask[:, :, None]
    # Dense over the rectangle, in place: where the mask is 0 each pixel gets its own value back
    # (x / scale * scale rounds to x); 2.5x faster than blending only the pixels the mask reaches.
    scale = full_scale(canvas.dtype)
    blended = region.astype(np.float32) / scale
    blended *= 1 - mask
    blended += face * mask
    if canvas.dtype.kind != "f":
        np.clip(blended, 0, 1, out=blended)
        blended *= scale
        np.round(blended, out=blended)
    region[...] = blended
