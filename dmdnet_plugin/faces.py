"""Face detection, 68-point landmarks and identity embeddings behind one small interface.

The default backend works offline with model files that ship in pip packages: dlib's HOG
(or CNN) detector, its 68-point shape predictor and its 128-d face embedding, from
``face-recognition-models``. The RetinaFace backend (facexlib) only replaces the detector,
when its weight files are present; landmarks and embeddings still come from dlib, so boxes
and identity distances mean the same with either backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

DETECT_MAX_SIDE = 1600  # larger photos are searched on a downscaled copy
# The face detectors every surface offers, with what each means (the CLI's --detector, the nodes' list).
DETECTORS = {
    "auto": "RetinaFace when its weights are found (--face-models or $DMDNET_FACEXLIB_DIR), else dlib HOG",
    "hog": "dlib's HOG detector (offline, fast on CPU)",
    "cnn": "dlib's CNN detector (offline, finds more faces, slower on CPU)",
    "retinaface": "facexlib RetinaFace (needs its weights)",
}
FACEXLIB_ENV = "DMDNET_FACEXLIB_DIR"
RETINAFACE_FILES = {
    "retinaface_resnet50": "detection_Resnet50_Final.pth",
    "retinaface_mobile0.25": "detection_mobilenet0.25_Final.pth",
}


class FaceModelsError(RuntimeError):
    """A face model file is missing or unusable."""


@dataclass
class Face:
    """One detected face, in the pixel coordinates of the image it was found in."""

    box: np.ndarray  # [x1, y1, x2, y2]
    landmarks: np.ndarray  # (68, 2)
    score: float
    embedding: np.ndarray | None = None  # (128,)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])


class FaceBackend(Protocol):
    """What the face helper, matching and tracking need from a backend, whichever detector it runs."""

    name: str

    def detect(self, rgb8: np.ndarray, embed: bool = True) -> list[Face]:
        """All faces of a uint8 RGB image, largest first, with landmarks (and embeddings, unless
        ``embed`` is False: they cost as much as detection, and only matching and tracking read them)."""
        ...

    def landmarks(self, rgb8: np.ndarray, box: np.ndarray) -> np.ndarray:
        """(68, 2) landmarks of the face inside ``box``."""
        ...

    def embed(self, rgb8: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The face's identity embedding."""
        ...


def _dlib_models_dir() -> Path:
    """``face_recognition_models`` imports ``pkg_resources`` (gone in new setuptools): locate it by spec."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FaceModelsError("face-recognition-models is not installed (pip install face-recognition-models)")
    return Path(spec.origin).parent / "models"


def downscaled(rgb8: np.ndarray, max_side: int = DETECT_MAX_SIDE) -> tuple[np.ndarray, float]:
    """A copy at most ``max_side`` wide or high (the image itself when smaller), and its scale."""
    h, w = rgb8.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return np.ascontiguousarray(rgb8), 1.0
    return cv2.resize(rgb8, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA), scale


class DlibBackend:
    """dlib detector + 68-point predictor + ResNet embedding, all offline."""

    name = "dlib"

    def __init__(self, detector: str = "hog") -> None:
        import dlib

        self._dlib = dlib
        models = _dlib_models_dir()
        if detector == "cnn":
            cnn = dlib.cnn_face_detection_model_v1(str(models / "mmod_human_face_detector.dat"))
            self._detect = lambda img, up: [(d.rect, d.confidence) for d in cnn(img, up)]
        elif detector == "hog":
            hog = dlib.get_frontal_face_detector()
            self._detect = lambda img, up: list(zip(*hog.run(img, up, 0.0)[:2]))
        else:
            raise ValueError(f"unknown dlib detector {detector!r} (hog or cnn)")
        self.name = f"dlib-{detector}"
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        self._embed = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def _boxes(self, rgb8: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Face boxes [x1, y1, x2, y2] with scores, searched on a copy at most DETECT_MAX_SIDE wide."""
        small, scale = downscaled(rgb8)
        upsample = 1 if max(small.shape[:2]) <= 1000 else 0  # finds faces down to about 40 px
        found = self._detect(small, upsample)
        return [
            (np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64) / scale, float(s)) for r, s in found
        ]

    def landmarks(self, rgb8: np.ndarray, box: np.ndarray) -> np.ndarray:
        """68 landmarks of the face inside ``box``."""
        rect = self._dlib.rectangle(*[int(round(v)) for v in box])
        shape = self._shape(np.ascontiguousarray(rgb8), rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def embed(self, rgb8: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """128-d identity embedding; same person at most ~0.6 apart (dlib's convention)."""
        dlib = self._dlib
        x1, y1 = landmarks.min(0)
        x2, y2 = landmarks.max(0)
        rect = dlib.rectangle(int(x1), int(y1), int(x2), int(y2))
        shape = dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks])
        return np.array(self._embed.compute_face_descriptor(np.ascontiguousarray(rgb8), shape, 0), dtype=np.float64)

    def detect(self, rgb8: np.ndarray, embed: bool = True) -> list[Face]:
        """All faces, largest first, with landmarks and (``embed``) embeddings."""
        faces = []
        for box, score in self._boxes(rgb8):
            lm = self.landmarks(rgb8, box)
            faces.append(Face(box, lm, score, self.embed(rgb8, lm) if embed else None))
        return sorted(faces, key=lambda f: -f.width)


class RetinaFaceBackend(DlibBackend):
    """facexlib RetinaFace boxes, dlib landmarks and embeddings (a DlibBackend with other boxes).

    The weights are read here with ``weights_only=True`` from the given folder; facexlib's own
    loader would try to download a missing file.
    """

    def __init__(self, model_dir: str | Path, model: str = "retinaface_resnet50", device: str = "cpu") -> None:
        super().__init__("hog")
        import torch

        path = Path(model_dir) / RETINAFACE_FILES[model]
        if not path.is_file():
            raise FaceModelsError(f"{path}: RetinaFace weights not found")
        try:
            from facexlib.detection.retinaface import RetinaFace
        except ImportError:
            raise FaceModelsError(
                "the retinaface backend needs facexlib (see docs/weights.md, 'Face models')"
            ) from None
        net = RetinaFace(network_name=model.removeprefix("retinaface_"), half=False, device=device)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
        except Exception as exc:
            raise FaceModelsError(f"{path}: not usable RetinaFace weights ({exc})") from None
        self._net = net.eval().to(device)
        self.name = model

    def _boxes(self, rgb8: np.ndarray) -> list[tuple[np.ndarray, float]]:
        import torch

        small, scale = downscaled(rgb8)
        with torch.no_grad():
            dets = self._net.detect_faces(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), conf_threshold=0.8)
        return [(np.asarray(d[:4], dtype=np.float64) / scale, float(d[4])) for d in dets]


def write_landmarks(path: Path, landmarks: np.ndarray) -> None:
    """The authors' landmark file format: 68 lines ``x y`` in image pixels. Written atomically."""
    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in landmarks))


def read_landmarks(path: Path) -> np.ndarray:
    """(68, 2) landmarks from a file of :func:`write_landmarks`' format (or the authors' files)."""
    return np.loadtxt(path).reshape(68, 2)


def landmark_path(image: Path, root: Path | None = None, landmarks_root: Path | None = None) -> Path:
    """Where the 68 landmarks of ``image`` are cached: ``NAME.ext.txt`` beside it, or at the same
    relative place under ``landmarks_root`` (the authors' RefsLandmark layout)."""
    if landmarks_root is None or root is None:
        return image.with_name(image.name + ".txt")
    return landmarks_root / image.relative_to(root).with_name(image.name + ".txt")


def retinaface_dir(explicit: str | Path | None = None) -> Path | None:
    """The folder given (or in $DMDNET_FACEXLIB_DIR) if it holds RetinaFace weights."""
    folder = explicit or os.environ.get(FACEXLIB_ENV)
    if folder and any((Path(folder) / f).is_file() for f in RETINAFACE_FILES.values()):
        return Path(folder)
    return None


def resolved_detector(name: str = "auto", model_dir: str | Path | None = None) -> str:
    """The detector ``name`` stands for here: ``auto`` is RetinaFace when its weights are found, else
    dlib HOG (a run's settings record which one found the faces)."""
    if name == "auto":
        return "retinaface" if retinaface_dir(model_dir) else "hog"
    return "hog" if name == "dlib" else name


def get_backend(name: str = "auto", model_dir: str | Path | None = None, device: str = "cpu") -> FaceBackend:
    """``auto``: RetinaFace when its weights are found (``model_dir`` or $DMDNET_FACEXLIB_DIR), else dlib HOG."""
    if name in ("hog", "cnn", "dlib"):
        return DlibBackend("hog" if name == "dlib" else name)
    if name not in ("auto", "retinaface", *RETINAFACE_FILES):
        raise ValueError(f"unknown face detector {name!r} ({', '.join(DETECTORS)})")
    folder = retinaface_dir(model_dir)
    if folder is None:
        if name == "auto":
            return DlibBackend("hog")
        raise FaceModelsError(
            f"retinaface needs {' or '.join(RETINAFACE_FILES.values())} in --face-models DIR or ${FACEXLIB_ENV}"
        )
    model = name if name in RETINAFACE_FILES else next(m for m, f in RETINAFACE_FILES.items() if (folder / f).is_file())
    return RetinaFaceBackend(folder, model, device)


def shared_backend(name: str = "auto", model_dir: str | Path | None = None, device: str = "cpu") -> FaceBackend:
    """:func:`get_backend`, loaded once per process: servers (Gradio, ComfyUI) build a restorer per
    request, and reading the face model files each time would cost more than a small photo's faces."""
    return _cached_backend(name, str(model_dir or os.environ.get(FACEXLIB_ENV) or ""), device)


@functools.lru_cache(maxsize=8)
def _cached_backend(name: str, model_dir: str, device: str) -> FaceBackend:
    return get_backend(name, model_dir or None, device)
