"""Faces in photos, with no model: detect, align, crop, mask and paste back.

CodeFormer keeps this apart from the network (its FaceRestoreHelper), and so do we: the
Restorer, the ComfyUI Detect Faces node and the building of identities from photos all use
this one helper, and none of them needs a model to find faces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .align import (
    TEMPLATE_68,
    alignment_matrix,
    component_boxes,
    face_mask,
    matrix_scale,
    paste_face,
    transform_points,
    warp_face,
)
from .components import CROP_SIZE
from .faces import Face, FaceBackend, get_backend
from .io import Picture, to_uint8

MIN_FACE = 24  # px; smaller faces hold too little to restore
Background = Callable[[np.ndarray, tuple[int, int]], np.ndarray]  # (pixels, output size) -> the upscaled photo


@dataclass(frozen=True)
class AlignedFace:
    """A face cut out to the template, with everything needed to restore and paste it back."""

    face: Face
    crop: np.ndarray  # (512, 512, 3) float32 RGB in [0, 1]
    matrix: np.ndarray  # 2x3, image pixels -> crop pixels
    boxes: np.ndarray  # (4, 4) component boxes in the crop
    boxes_from: str  # "landmarks" or "template"
    source_index: int = 0  # which image of a batch the face is in
    track: int | None = None  # which track of a clip (:mod:`tracking`); None for photos

    @property
    def box(self) -> np.ndarray:
        """[x1, y1, x2, y2] in the pixels of the image the face was found in."""
        return self.face.box

    @property
    def enlargement(self) -> float:
        """How much the crop enlarges the face (above 1: the crop is softer than the photo)."""
        return matrix_scale(self.matrix)

    @property
    def crop_landmarks(self) -> np.ndarray:
        """The face's landmarks in crop pixels."""
        return transform_points(self.face.landmarks, self.matrix)


@dataclass(frozen=True)
class Detection:
    """The faces found in one image, and those left out with the reason."""

    faces: tuple[AlignedFace, ...]
    skipped: tuple[dict, ...] = ()


class FaceHelper:
    """Finds and aligns faces, and pastes restored crops back; holds no restoration model.

    ``min_face`` (px): narrower faces are skipped. ``max_faces`` (None: all) and
    ``only_largest`` limit how many faces of each image are kept, largest first.
    """

    def __init__(
        self,
        backend: FaceBackend | None = None,
        min_face: int = MIN_FACE,
        max_faces: int | None = None,
        only_largest: bool = False,
    ) -> None:
        self.backend = backend or get_backend()
        self.min_face = min_face
        self.max_faces = max_faces
        self.only_largest = only_largest

    def align(self, rgb: np.ndarray, face: Face, source_index: int = 0) -> AlignedFace:
        matrix = alignment_matrix(face.landmarks)
        crop = warp_face(rgb, matrix)
        boxes, boxes_from = component_boxes(transform_points(face.landmarks, matrix))
        return AlignedFace(face, crop, matrix, boxes, boxes_from, source_index)

    def select(self, rgb8: np.ndarray, embed: bool = True) -> tuple[list[Face], list[dict]]:
        """The faces of a uint8 RGB image that this helper keeps (size, count), and those left out
        with the reason; not aligned (a clip's tracker aligns later, on smoothed landmarks)."""
        kept, skipped = [], []
        for face in self.backend.detect(rgb8, embed):
            if face.width < self.min_face:
                reason = f"face is {face.width:.0f} px wide, below the minimum of {self.min_face}"
            elif (self.only_largest and kept) or (self.max_faces is not None and len(kept) >= self.max_faces):
                reason = "more faces than requested"
            else:
                kept.append(face)
                continue
            skipped.append({"box": [round(float(v), 1) for v in face.box], "reason": reason})
        return kept, skipped

    def detect(
        self, rgb: np.ndarray, source_index: int = 0, embed: bool = True, rgb8: np.ndarray | None = None
    ) -> Detection:
        """Aligned faces of a float RGB image, and the faces left out with the reason (``rgb8``: the
        same image as uint8, when the caller has it: :meth:`Picture.rgb8` saves a conversion)."""
        kept, skipped = self.select(to_uint8(rgb) if rgb8 is None else rgb8, embed)
        return Detection(tuple(self.align(rgb, face, source_index) for face in kept), tuple(skipped))

    def align_whole(self, rgb: np.ndarray, source_index: int = 0, embed: bool = True) -> AlignedFace:
        """Treat the whole image as an aligned crop (``--aligned``); landmarks only give the boxes."""
        h, w = rgb.shape[:2]
        matrix = np.array([[CROP_SIZE / w, 0, 0], [0, CROP_SIZE / h, 0]])
        interp = cv2.INTER_AREA if w > CROP_SIZE else cv2.INTER_CUBIC
        crop = (
            rgb if (h, w) == (CROP_SIZE, CROP_SIZE) else cv2.resize(rgb, (CROP_SIZE, CROP_SIZE), interpolation=interp)
        )
        crop = np.clip(crop, 0, 1).astype(np.float32)
        crop8 = to_uint8(crop)
        found = self.backend.detect(crop8, embed)
        # Undetected means missing: a shape predictor run blind returns its prior, not the face.
        boxes, boxes_from = component_boxes(found[0].landmarks if found else None)
        landmarks = found[0].landmarks if boxes_from == "landmarks" else TEMPLATE_68
        embedding = found[0].embedding if found else self.backend.embed(crop8, landmarks) if embed else None
        face = Face(
            np.array([0.0, 0.0, w, h]),
            transform_points(landmarks, cv2.invertAffineTransform(matrix)),
            found[0].score if found else 0.0,
            embedding,
        )
        return AlignedFace(face, crop, matrix, boxes, boxes_from, source_index)

    def find(self, pictures: Sequence[Picture], aligned: bool = False, embed: bool = True) -> list[Detection]:
        """One :class:`Detection` per picture; ``aligned``: each picture is one aligned face;
        ``embed``: with the faces' embeddings (for matching identities)."""
        if aligned:
            return [Detection((self.align_whole(p.rgb(), i, embed),)) for i, p in enumerate(pictures)]
        return [self.detect(p.rgb(), i, embed, p.rgb8()) for i, p in enumerate(pictures)]

    @staticmethod
    def masks(faces: Sequence[AlignedFace], sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """(N, H, W) float32: per image, how strongly the paste-back blends each pixel (max over faces)."""
        h, w = sizes[0] if sizes else (0, 0)
        out = np.zeros((len(sizes), h, w), np.float32)
        for f in faces:
            np.maximum(out[f.source_index], face_mask(h, w, f.matrix), out=out[f.source_index])
        return out

    @staticmethod
    def paste(
        picture: Picture,
        restored: Sequence[tuple[AlignedFace, np.ndarray]],
        upscale: float = 1.0,
        strength: float = 1.0,
        background: Background | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The photo (resized by ``upscale``; by ``background``, a super-resolution model, when given)
        with every (face, restored crop) blended in."""
        canvas, alpha = picture.pixels, picture.alpha
        w, h = picture.size
        size = (round(w * upscale), round(h * upscale))
        if background is not None:
            canvas = background(canvas, size)
        elif upscale != 1.0:
            canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_LANCZOS4)
        if alpha is not None and size != (w, h):
            alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
        canvas = canvas.copy()
        for face, crop in restored:
            matrix = face.matrix.copy()
            matrix[:, :2] /= upscale
            paste_face(canvas, crop, matrix, strength)
        return canvas, alpha
