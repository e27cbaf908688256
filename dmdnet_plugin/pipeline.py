"""Whole photos in, restored ones out: the one photo pipeline behind every surface.

find faces (:mod:`face_helper`) -> decide each face's identity (:class:`Mode`) ->
DMDNet.restore (batched per identity) -> paste back. The ComfyUI nodes and the Gradio demo
call :meth:`Restorer.run` for photos (GFPGAN's ``enhance()`` idea), the photo stream its
stages (:meth:`Restorer.restore_faces`, :meth:`Restorer.finish`), and :mod:`clips` builds a
clip's run on the same two: they return frozen results and change nothing they are given, so
a surface holds no loop over faces, no identity override and no paste-back of its own.
:func:`dmdnet_plugin.factory.load_restorer` is the one way to build a Restorer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .colours import keep_colours as keep_colours_of
from .damage import damaged_embedding
from .face_helper import AlignedFace, Background, Detection, FaceHelper
from .identity import IdentityDictionary
from .io import ImageError, ImageWriter, Picture, check_pixels, read_image, to_uint8, write_image
from .matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD, Match, match
from .model import DMDNet
from .weights import LoadedModel

Progress = Callable[[int, int], None]  # (faces done, faces in the run)
Smoother = Callable[[int, np.ndarray], np.ndarray]  # (track, restored crop) -> steadier crop, in frame order
Reference = str | Path | tuple[str, np.ndarray]  # a file, or (label, float RGB pixels)
FRAMES_PER_RUN = 8  # pictures (a clip's frames, a folder's photos) whose faces are restored together; bounds memory
T = TypeVar("T")


class Mode(str, Enum):
    """How faces get identities. Every mode restores with the same model and paste-back."""

    AUTO = "auto"  # the nearest identity within the threshold; generic otherwise
    GENERIC = "generic"  # every face generic; identities are ignored
    IDENTITY = "identity"  # every face with the one given identity, matched or not
    ONLY_MATCHED = "only-matched"  # faces matching an identity are restored with it; others stay as they are


def checked_mode(mode: Mode | str, identities: Sequence[IdentityDictionary]) -> Mode:
    """The mode, checked against the identities given: the one place every surface's mode is parsed."""
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(f"{mode!r} is not a valid Mode; use one of {', '.join(m.value for m in Mode)}") from None
    if mode in (Mode.IDENTITY, Mode.ONLY_MATCHED) and not identities:
        people = " (the people to restore)" if mode is Mode.ONLY_MATCHED else ""
        raise ValueError(
            f"mode '{mode.value}' needs reference photos or an identity dictionary{people}, and none was given"
        )
    if mode is Mode.IDENTITY and len(identities) != 1:
        raise ValueError(f"mode 'identity' needs exactly one identity dictionary, got {len(identities)}")
    return mode


def needs_embeddings(mode: Mode, identities: Sequence[IdentityDictionary]) -> bool:
    """Whether faces must be embedded: only to match them with identities (a sixth of a photo's time)."""
    return mode is not Mode.GENERIC and bool(identities)


@dataclass(frozen=True)
class FaceResult:
    """One face: where it is, the identity it was given, and its crop before and after."""

    face: AlignedFace
    identity: IdentityDictionary | None  # the dictionary used; None: generic (or left as it was)
    match: Match | None  # the matching decision; None in generic mode
    restored: np.ndarray | None  # like ``face.crop``; None when the face was left as it was
    left_as_is: str | None = None  # why it was not restored (only-matched mode), for reports

    @property
    def crop(self) -> np.ndarray:
        return self.face.crop

    @property
    def distance(self) -> float | None:
        """To the nearest identity's mean embedding; None without identities."""
        return None if self.match is None else self.match.distance

    def record(self) -> dict:
        """The face's entry in a JSON report (box in input-image pixels)."""
        entry = {
            "box": [round(float(v), 1) for v in self.face.box],
            "identity": None if self.identity is None else (self.identity.name or "unnamed"),
            "distance": None if self.distance is None else round(self.distance, 4),
            "boxes_from": self.face.boxes_from,
        }
        if self.face.track is not None:
            entry["track"] = self.face.track
        if self.match is not None:
            entry.update(self.match.record())
        if self.left_as_is is not None:
            entry["left_as_is"] = self.left_as_is
        return entry


@dataclass(frozen=True)
class ImageResult:
    """One restored image in the input's dtype, layout and alpha, with its faces."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    faces: tuple[FaceResult, ...]
    skipped: tuple[dict, ...] = ()


def crops_to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 float RGB crops in [0, 1] -> (N, 3, 512, 512) in [-1, 1]."""
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2 - 1


def tensor_to_crops(t: torch.Tensor) -> list[np.ndarray]:
    arr = ((t.float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return list(arr)


class Restorer:
    """Restores every face of a batch of photos with one model, a face helper and identities.

    ``model``: a :class:`LoadedModel` (its precision is used), or a bare DMDNet run in fp32.
    ``threshold`` and ``margin``: the matching rule (:mod:`matching`): near enough to a person's
    mean embedding, and clearly nearer to it than to anyone else. ``batch_size``: faces per model call.
    """

    def __init__(
        self,
        model: LoadedModel | DMDNet,
        helper: FaceHelper | None = None,
        identities: Sequence[IdentityDictionary] = (),
        threshold: float = DEFAULT_THRESHOLD,
        batch_size: int = 4,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        self.loaded = model if isinstance(model, LoadedModel) else LoadedModel(model)
        self.model = self.loaded.net
        self.helper = helper or FaceHelper()
        self.identities = tuple(identities)
        for ident in self.identities:
            self.model.check_identity(ident)
        self.threshold = threshold
        self.margin = margin
        self.batch_size = max(1, batch_size)

    # ------------------------------------------------------------ identities
    def _decide(
        self, face: AlignedFace, mode: Mode, identities: Sequence[IdentityDictionary]
    ) -> tuple[IdentityDictionary | None, Match | None, str | None]:
        """(identity to restore with, the matching decision, why the face is left as it was; None: restore it)."""
        if mode is Mode.GENERIC or (mode is Mode.AUTO and not identities):  # nothing to decide
            return None, None, None
        decision = match(face.face.embedding, identities, self.threshold, self.margin)
        if mode is Mode.IDENTITY:
            return identities[0], decision, None
        if decision.identity is not None or mode is Mode.AUTO:
            return decision.identity, decision, None
        return None, decision, f"no identity matched: {decision.reason}"

    def build_identity(
        self, references: Sequence[Reference], name: str | None = None, aligned: bool = False
    ) -> tuple[IdentityDictionary, list[str]]:
        """Identity dictionary from the largest face of each reference (files or pixels).

        Returns it with one line per rejected reference; raises ValueError if all were.
        """
        faces, rejected = [], []
        for ref in references:
            label, rgb = ref if isinstance(ref, tuple) else (str(ref), None)
            try:
                rgb = read_image(ref).rgb() if rgb is None else rgb
            except ImageError as exc:
                rejected.append(str(exc))
                continue
            found = [self.helper.align_whole(rgb)] if aligned else self.helper.detect(rgb).faces
            if found:
                faces.append(found[0])
            else:
                rejected.append(f"{label}: no face found")
        if not faces:
            raise ValueError("no usable reference: " + "; ".join(rejected))
        ident = self.loaded.encode_identity(
            crops_to_tensor([f.crop for f in faces]),
            torch.from_numpy(np.stack([f.boxes for f in faces])),
            name=name,
            embeddings=np.stack([f.face.embedding for f in faces]),
            damaged_embeddings=np.stack(
                [damaged_embedding(self.helper.backend, f.crop, f.crop_landmarks) for f in faces]
            ),
        )
        return ident, rejected

    # ------------------------------------------------------------ restoration
    def _restore(
        self, jobs: Sequence[tuple[AlignedFace, IdentityDictionary | None]], progress: Progress | None
    ) -> list[np.ndarray]:
        """Restored crops in the order of ``jobs``: one batched model call per identity group."""
        groups: dict[IdentityDictionary | None, list[int]] = {}  # dictionaries hash by identity
        for index, (_, ident) in enumerate(jobs):
            groups.setdefault(ident, []).append(index)
        out: list[np.ndarray | None] = [None] * len(jobs)
        done = 0
        for ident, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                restored = self.loaded.restore(
                    crops_to_tensor([jobs[i][0].crop for i in batch]),
                    torch.from_numpy(np.stack([jobs[i][0].boxes for i in batch])),
                    identity=ident,
                )
                for i, crop in zip(batch, tensor_to_crops(restored)):
                    out[i] = crop
                done += len(batch)
                if progress:
                    progress(done, len(jobs))
        return out

    def run(
        self,
        pictures: Sequence[Picture],
        mode: Mode | str = Mode.AUTO,
        identities: Sequence[IdentityDictionary] | None = None,
        strength: float = 1.0,
        upscale: float = 1.0,
        aligned: bool = False,
        detections: Sequence[Detection] | None = None,
        progress: Progress | None = None,
        smoother: Smoother | None = None,
        keep_colours: bool = True,
        background: Background | None = None,
    ) -> list[ImageResult]:
        """Restore the faces of every picture; one result per picture.

        ``identities`` replaces the Restorer's own for this run (``Mode.IDENTITY`` takes exactly
        one). ``strength`` blends the restored faces over the originals. ``aligned``: each picture
        is one aligned 512x512 face. ``detections`` (one per picture, e.g. from
        :meth:`FaceHelper.find`) skips face detection. ``smoother``: a clip's frames, run in order
        with tracked detections (:mod:`tracking`), get steady restored faces (:func:`clips.restore_clip`
        sets this up). ``keep_colours``: restored faces keep the input's broad colours
        (:mod:`colours`); False: the model's. ``background``: the photos resized by a super-resolution
        model (:func:`background.load_upsampler`) instead of a plain resize.
        """
        identities = self.checked_identities(identities)
        mode = checked_mode(mode, identities)
        if detections is None:
            detections = self.helper.find(pictures, aligned, embed=needs_embeddings(mode, identities))
        if len(detections) != len(pictures):
            raise ValueError(f"{len(detections)} detections for {len(pictures)} pictures")
        faces = self.restore_faces(detections, mode, identities, progress)
        return [
            self.finish(picture, detection, image, upscale, strength, keep_colours, smoother, background)
            for picture, detection, image in zip(pictures, detections, faces)
        ]

    def checked_identities(self, identities: Sequence[IdentityDictionary] | None) -> tuple[IdentityDictionary, ...]:
        """The identities of a run (the Restorer's own when None), each checked against the model."""
        if identities is None:
            return self.identities
        identities = tuple(identities)
        for ident in identities:
            self.model.check_identity(ident)
        return identities

    def restore_faces(
        self,
        detections: Sequence[Detection],
        mode: Mode,
        identities: Sequence[IdentityDictionary],
        progress: Progress | None = None,
    ) -> list[tuple[FaceResult, ...]]:
        """The model's part of a run: each face's identity, and the faces of all the pictures restored
        in batches across them. One tuple per picture; the crops are the model's (no colours yet)."""
        decided = [[(f, *self._decide(f, mode, identities)) for f in d.faces] for d in detections]
        jobs = [(f, ident) for image in decided for f, ident, _, why in image if why is None]
        crops = iter(self._restore(jobs, progress))  # in the order of ``jobs``: picture by picture
        return [
            tuple(
                FaceResult(f, ident, decision, next(crops) if why is None else None, why)
                for f, ident, decision, why in image
            )
            for image in decided
        ]

    @staticmethod
    def finish(
        picture: Picture,
        detection: Detection,
        faces: tuple[FaceResult, ...],
        upscale: float = 1.0,
        strength: float = 1.0,
        keep_colours: bool = True,
        smoother: Smoother | None = None,
        background: Background | None = None,
    ) -> ImageResult:
        """The rest of a run for one picture, on the CPU: colours, smoothing over a clip (in frame
        order), paste-back (over ``background``: the photo upscaled by a super-resolution model,
        :mod:`background`). Pictures are independent here and the face model is not needed, so a
        pipeline can finish them in threads or on other machines (:mod:`cluster`)."""
        if keep_colours:
            faces = tuple(
                f if f.restored is None else replace(f, restored=keep_colours_of(f.restored, f.crop)) for f in faces
            )
        if smoother is not None:
            faces = tuple(
                f
                if f.restored is None or f.face.track is None
                else replace(f, restored=smoother(f.face.track, f.restored))
                for f in faces
            )
        width, height = (round(side * upscale) for side in picture.size)
        check_pixels(width, height, f"the output ({upscale}x)")  # before a huge canvas is allocated
        pixels, alpha = FaceHelper.paste(
            picture, [(f.face, f.restored) for f in faces if f.restored is not None], upscale, strength, background
        )
        return ImageResult(pixels, alpha, faces, detection.skipped)

    def compare(
        self,
        picture: Picture,
        mode: Mode | str = Mode.AUTO,
        identities: Sequence[IdentityDictionary] | None = None,
        strength: float = 1.0,
        upscale: float = 1.0,
        keep_colours: bool = True,
        background: Background | None = None,
    ) -> tuple[ImageResult, ImageResult | None]:
        """The photo restored generic, and with the identities in ``mode`` (None without identities or
        in generic mode), from one face detection (and one ``background``): what a before/after page
        shows side by side."""
        identities = self.checked_identities(identities)
        mode = checked_mode(mode, identities)
        detections = self.helper.find([picture], embed=needs_embeddings(mode, identities))
        if background is not None:
            size = (round(picture.size[0] * upscale), round(picture.size[1] * upscale))
            canvas = background(picture.pixels, size)
            background = lambda _pixels, _size: canvas  # noqa: E731  (made once for both results)
        options = {"strength": strength, "upscale": upscale, "detections": detections, "keep_colours": keep_colours}
        options["background"] = background
        generic = self.run([picture], Mode.GENERIC, (), **options)[0]
        if mode is Mode.GENERIC or not identities:
            return generic, None
        return generic, self.run([picture], mode, identities, **options)[0]


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter), read lazily: a clip's frames or a
    folder's photos are never all held."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def save_faces(result: ImageResult, out_dir: Path, stem: str, save: ImageWriter = write_image) -> None:
    """GFPGAN's layout: cropped_faces/ and restored_faces/ beside the outputs (``save``: how a file is
    written, :func:`write_image` or a cluster's filesystem)."""
    for i, f in enumerate(result.faces):
        for folder, crop in (("cropped_faces", f.crop), ("restored_faces", f.restored)):
            if crop is not None:
                save(out_dir / folder / f"{stem}_{i:02d}.png", to_uint8(crop), None)
