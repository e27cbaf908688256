"""Whole photos in, restored photos out: the one pipeline behind every surface.

detect -> align -> component boxes -> match identity -> DMDNet.restore (batched per
identity) -> paste back. The CLI, the ComfyUI nodes and the Gradio demo call
:class:`Restorer`; none of them holds box, alignment or paste-back logic of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from .align import (
    TEMPLATE_68,
    alignment_matrix,
    component_boxes,
    paste_face,
    transform_points,
    warp_face,
)
from .components import CROP_SIZE
from .faces import DlibBackend, Face, get_backend
from .identity import IdentityDictionary
from .io import Picture, to_uint8, write_image
from .model import DMDNet

# Largest distance between a face's dlib embedding and an identity's mean embedding that still
# counts as that person; measured on ../shared/faces by benchmarks/measure_identity_threshold.py.
DEFAULT_THRESHOLD = 0.5
MIN_FACE = 24  # px; smaller faces hold too little to restore
Progress = Callable[[int, int], None]


@dataclass
class AlignedFace:
    """A face cut out to the template, with everything needed to restore and paste it back."""

    face: Face
    crop: np.ndarray  # (512, 512, 3) float32 RGB in [0, 1]
    matrix: np.ndarray  # 2x3, image pixels -> crop pixels
    boxes: np.ndarray  # (4, 4) component boxes in the crop
    boxes_from: str  # "landmarks" or "template"
    source_index: int = 0
    identity: IdentityDictionary | None = None
    distance: float | None = None
    restored: np.ndarray | None = None  # like ``crop``, once restored

    def record(self) -> dict:
        """The face's entry in a JSON report (box in input-image pixels)."""
        return {
            "box": [round(float(v), 1) for v in self.face.box],
            "identity": None if self.identity is None else (self.identity.name or "unnamed"),
            "distance": None if self.distance is None else round(self.distance, 4),
            "boxes_from": self.boxes_from,
        }


@dataclass
class ImageResult:
    pixels: np.ndarray  # native dtype and layout of the input
    alpha: np.ndarray | None
    faces: list[AlignedFace] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def crops_to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 float RGB crops in [0, 1] -> (N, 3, 512, 512) in [-1, 1]."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2 - 1


def tensor_to_crops(t: torch.Tensor) -> list[np.ndarray]:
    arr = ((t.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return list(arr)


class Restorer:
    """Restores every face of a photo with one model, a face backend and optional identities.

    ``model`` may be None for detection and alignment alone (ComfyUI's Detect Faces node).
    """

    def __init__(
        self,
        model: DMDNet | None,
        backend: DlibBackend | None = None,
        identities: Sequence[IdentityDictionary] = (),
        threshold: float = DEFAULT_THRESHOLD,
        batch_size: int = 4,
        min_face: int = MIN_FACE,
        max_faces: int | None = None,
        only_largest: bool = False,
    ) -> None:
        self.model = model
        self.backend = backend or get_backend()
        self.identities = list(identities)
        for ident in self.identities:
            ident.check_fits(model.fingerprint())
        self.threshold = threshold
        self.batch_size = max(1, batch_size)
        self.min_face = min_face
        self.max_faces = max_faces
        self.only_largest = only_largest

    # ------------------------------------------------------------ detection
    def align(self, rgb: np.ndarray, face: Face, source_index: int = 0) -> AlignedFace:
        matrix = alignment_matrix(face.landmarks)
        crop = warp_face(rgb, matrix)
        boxes, boxes_from = component_boxes(transform_points(face.landmarks, matrix))
        return AlignedFace(face, crop, matrix, boxes, boxes_from, source_index)

    def detect(self, rgb: np.ndarray, source_index: int = 0) -> tuple[list[AlignedFace], list[dict]]:
        """Aligned faces of a float RGB image, and the faces left out with the reason."""
        rgb8 = to_uint8(rgb)
        kept, skipped = [], []
        for face in self.backend.detect(rgb8):
            if face.width < self.min_face:
                reason = f"face is {face.width:.0f} px wide, below the minimum of {self.min_face}"
            elif (self.only_largest and kept) or (self.max_faces is not None and len(kept) >= self.max_faces):
                reason = "more faces than requested"
            else:
                kept.append(self.align(rgb, face, source_index))
                continue
            skipped.append({"box": [round(float(v), 1) for v in face.box], "reason": reason})
        return kept, skipped

    def align_whole(self, rgb: np.ndarray, source_index: int = 0) -> AlignedFace:
        """Treat the whole image as an aligned crop (``--aligned``); landmarks only give the boxes."""
        h, w = rgb.shape[:2]
        matrix = np.array([[CROP_SIZE / w, 0, 0], [0, CROP_SIZE / h, 0]])
        interp = cv2.INTER_AREA if w > CROP_SIZE else cv2.INTER_CUBIC
        crop = rgb if (h, w) == (CROP_SIZE, CROP_SIZE) else cv2.resize(rgb, (CROP_SIZE, CROP_SIZE), interpolation=interp)
        crop = np.clip(crop, 0, 1).astype(np.float32)
        crop8 = to_uint8(crop)
        found = self.backend.detect(crop8)
        # Undetected means missing: a shape predictor run blind returns its prior, not the face.
        boxes, boxes_from = component_boxes(found[0].landmarks if found else None)
        landmarks = found[0].landmarks if boxes_from == "landmarks" else TEMPLATE_68
        embedding = found[0].embedding if found else self.backend.embed(crop8, landmarks)
        face = Face(np.array([0.0, 0.0, w, h]), transform_points(landmarks, cv2.invertAffineTransform(matrix)),
                    found[0].score if found else 0.0, embedding)
        return AlignedFace(face, crop, matrix, boxes, boxes_from, source_index)

    # ------------------------------------------------------------ identities
    def match(self, faces: Sequence[AlignedFace]) -> None:
        """Give each face the nearest identity within the threshold (generic otherwise)."""
        known = [i for i in self.identities if i.embedding is not None]
        for f in faces:
            f.identity, f.distance = None, None
            if f.face.embedding is None or not known:
                continue
            dists = [float(np.linalg.norm(f.face.embedding - i.embedding)) for i in known]
            best = int(np.argmin(dists))
            f.distance = dists[best]
            if dists[best] <= self.threshold:
                f.identity = known[best]

    def build_identity(
        self, references: Sequence[tuple[str, np.ndarray]], name: str | None = None, aligned: bool = False
    ) -> tuple[IdentityDictionary, list[str]]:
        """Identity dictionary from the largest face of each (label, float RGB) reference.

        Returns it with the reasons references were rejected; raises ValueError if all were.
        """
        faces, rejected = [], []
        for label, rgb in references:
            found = [self.align_whole(rgb)] if aligned else self.detect(rgb)[0]
            if found:
                faces.append(found[0])
            else:
                rejected.append(f"{label}: no face found")
        if not faces:
            raise ValueError("no usable reference: " + "; ".join(rejected))
        ident = self.model.build_identity(
            crops_to_tensor([f.crop for f in faces]),
            torch.from_numpy(np.stack([f.boxes for f in faces])),
            name=name,
            embeddings=np.stack([f.face.embedding for f in faces]),
        )
        return ident, rejected

    # ------------------------------------------------------------ restoration
    def restore_faces(self, faces: Sequence[AlignedFace], progress: Progress | None = None) -> None:
        """Fill ``restored`` for every face: one batched model call per identity group."""
        groups: dict[int, list[AlignedFace]] = {}
        for f in faces:
            groups.setdefault(id(f.identity), []).append(f)
        done = 0
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                out = self.model.restore(
                    crops_to_tensor([f.crop for f in batch]),
                    torch.from_numpy(np.stack([f.boxes for f in batch])),
                    identity=batch[0].identity,
                )
                for f, crop in zip(batch, tensor_to_crops(out)):
                    f.restored = crop
                done += len(batch)
                if progress:
                    progress(done, len(faces))

    def restore_image(
        self, picture: Picture, aligned: bool = False, upscale: float = 1.0, strength: float = 1.0,
        progress: Progress | None = None,
    ) -> ImageResult:
        """Restore all faces of a photo; the result has the input's dtype, layout and alpha."""
        rgb = picture.rgb()
        if aligned:
            faces, skipped = [self.align_whole(rgb)], []
        else:
            faces, skipped = self.detect(rgb)
        self.match(faces)
        self.restore_faces(faces, progress)
        return ImageResult(*self.paste(picture, faces, upscale, strength), faces, skipped)

    @staticmethod
    def paste(
        picture: Picture, faces: Sequence[AlignedFace], upscale: float = 1.0, strength: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The photo (resized by ``upscale``) with every restored face blended in."""
        canvas, alpha = picture.pixels, picture.alpha
        if upscale != 1.0:
            w, h = picture.size
            size = (round(w * upscale), round(h * upscale))
            canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_LANCZOS4)
            alpha = None if alpha is None else cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
        canvas = canvas.copy()
        for f in faces:
            if f.restored is not None:
                matrix = f.matrix.copy()
                matrix[:, :2] /= upscale
                paste_face(canvas, f.restored, matrix, strength)
        return canvas, alpha

    def save_faces(self, result: ImageResult, out_dir: Path, stem: str) -> None:
        """GFPGAN's layout: cropped_faces/ and restored_faces/ beside the outputs."""
        for i, f in enumerate(result.faces):
            for folder, crop in (("cropped_faces", f.crop), ("restored_faces", f.restored)):
                if crop is not None:
                    write_image(out_dir / folder / f"{stem}_{i:02d}.png", to_uint8(crop))

