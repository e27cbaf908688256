"""The one way every surface builds a :class:`Restorer`: weights, device, precision, face backend.

The Gradio demo, the ComfyUI nodes and ``make demo`` call :func:`load_restorer`, and a run's
settings (:class:`~dmdnet_plugin.settings.RunSettings`, what the CLI builds) call it too,
so that they agree on which weights are found, where the model runs, that the face backend runs
on the model's device (RetinaFace on CUDA), and on every matching and face-selection default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .face_helper import MIN_FACE, FaceHelper
from .faces import shared_backend
from .identity import IdentityDictionary
from .matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from .pipeline import Restorer
from .weights import LoadedModel, load_model


def load_restorer(
    weights: str | Path | LoadedModel | None = None,
    device: str | torch.device | None = None,
    precision: str | torch.dtype | None = None,
    detector: str = "auto",
    face_models: str | Path | None = None,
    identities: Sequence[IdentityDictionary] = (),
    threshold: float = DEFAULT_THRESHOLD,
    margin: float = DEFAULT_MARGIN,
    batch_size: int = 4,
    min_face: int = MIN_FACE,
    only_largest: bool = False,
    max_faces: int | None = None,
) -> Restorer:
    """A Restorer for ``weights``: a checkpoint path (None: found as :func:`find_weights` says), or a
    model already loaded (ComfyUI's loader node; then ``device`` and ``precision`` are its own).

    ``device`` and ``precision`` follow :mod:`runtime`'s rule. The face backend (``detector``,
    RetinaFace weights in ``face_models``) is loaded once per process and runs on the model's device.
    """
    if isinstance(weights, LoadedModel):
        if device is not None or precision is not None:
            raise ValueError("a loaded model keeps its own device and precision")
        model = weights
    else:
        model = load_model(weights, device=device, precision=precision)
    helper = load_face_helper(detector, face_models, model.device.type, min_face, only_largest, max_faces)
    return Restorer(model, helper, identities, threshold=threshold, batch_size=batch_size, margin=margin)


def load_face_helper(
    detector: str = "auto",
    face_models: str | Path | None = None,
    device: str = "cpu",
    min_face: int = MIN_FACE,
    only_largest: bool = False,
    max_faces: int | None = None,
) -> FaceHelper:
    """The face helper of :func:`load_restorer`, without a model: for a stage that only finds faces
    (a cluster's detect actors). The backend is loaded once per process."""
    backend = shared_backend(detector, None if face_models is None else str(face_models), device)
    return FaceHelper(backend, min_face=min_face, max_faces=max_faces, only_largest=only_largest)
