"""Everything a run's outputs depend on, as one frozen record.

The CLI builds it once from its options (Python callers with :meth:`RunSettings.create`); the
restorer, the photo stream, the video loop, each Ray actor, the journal's key and the report's
header all come from it. The journal key is a hash of every field, so an option added here can
never be forgotten by resume: a run with other settings never keeps an earlier run's outputs.
Files enter the record by their content (sha256): weights copied over the same name, or an
identity rebuilt under the same name, make another record.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .background import Upsampler, UpsamplerError, load_upsampler, loaded_upsampler
from .face_helper import MIN_FACE, FaceHelper
from .faces import FaceModelsError, resolved_detector, retinaface_dir
from .factory import load_face_helper, load_restorer
from .identity import IdentityDictionary
from .matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from .pipeline import Mode, Restorer, checked_mode
from .runtime import pick_device, pick_precision, precision_name
from .text import printable
from .version import VERSION
from .weights import WeightsSource, find_weights, sha256_of

MAX_UPSCALE = 16  # times the photo's size; the pixel limit holds beyond it anyway


@dataclass(frozen=True)
class WeightsRef:
    """The checkpoint of a run: which file, why it was chosen, and its content."""

    source: WeightsSource
    sha256: str

    @classmethod
    def of(cls, weights: str | Path | WeightsSource | None) -> WeightsRef:
        source = find_weights(weights)
        return cls(source, sha256_of(source.path))

    def record(self) -> dict:
        return {**self.source.record(), "sha256": self.sha256}


@dataclass(frozen=True)
class IdentityRef:
    """An identity of a run: the dictionary, its content hash, and the file it came from."""

    dictionary: IdentityDictionary = field(repr=False)
    sha256: str
    file: str | None = None

    @classmethod
    def of(cls, identity: str | Path | IdentityDictionary) -> IdentityRef:
        if isinstance(identity, IdentityDictionary):
            return cls(identity, identity.digest())
        dictionary = IdentityDictionary.load(identity)
        return cls(dictionary, dictionary.digest(), str(identity))

    def record(self) -> dict:
        return {"name": self.dictionary.name, "sha256": self.sha256, "file": self.file}


@dataclass(frozen=True)
class FileRef:
    """A model file a run uses besides its weights (a background upsampler): its path and content."""

    path: str
    sha256: str

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class RunSettings:
    """What a run does to every input. Build it with :meth:`create`, which resolves what "auto" and
    "default" stand for on this machine (weights, device, precision, detector)."""

    weights: WeightsRef
    device: str  # "cpu", "cuda", "cuda:1"
    precision: str  # as resolved: "fp32", "bf16" or "fp16"
    mode: Mode = Mode.AUTO
    identities: tuple[IdentityRef, ...] = ()
    upscale: float = 1.0
    strength: float = 1.0
    keep_colours: bool = True
    aligned: bool = False
    temporal: bool = True  # videos: tracked and smoothed
    threshold: float = DEFAULT_THRESHOLD
    margin: float = DEFAULT_MARGIN
    min_face: int = MIN_FACE
    only_largest: bool = False
    max_faces: int | None = None
    detector: str = "hog"  # as resolved: "hog", "cnn" or "retinaface"
    face_models: str | None = None  # RetinaFace's weights folder, when it is used
    batch_size: int = 4  # on the CPU a face's pixels can depend on its batch
    save_faces: bool = False
    bg_upsampler: FileRef | None = None  # a super-resolution model for the rest of the photo
    version: str = VERSION

    @classmethod
    def create(
        cls,
        weights: str | Path | WeightsSource | None = None,
        device: str | None = None,
        precision: str = "auto",
        identities: tuple[str | Path | IdentityDictionary, ...] | list = (),
        mode: Mode | str = Mode.AUTO,
        detector: str = "auto",
        face_models: str | Path | None = None,
        bg_upsampler: str | Path | None = None,
        **options,
    ) -> RunSettings:
        """The settings of a run, checked before any work: a wrong value is one ValueError line.

        ``bg_upsampler``: a super-resolution model file for the rest of the photo (loaded here, so a
        file that is not one fails now); ``upscale`` None is its scale, else 1. ``options``: any other
        field (upscale, strength, keep_colours, aligned, temporal, threshold, margin, min_face,
        only_largest, max_faces, batch_size, save_faces).
        """
        background = None if bg_upsampler is None else load_upsampler(bg_upsampler)
        if options.get("upscale") is None:
            options["upscale"] = 1.0 if background is None else float(background.scale)
            if options["upscale"] > MAX_UPSCALE:
                raise UpsamplerError(
                    f"{printable(bg_upsampler)}: a {background.scale}x model; give an upscale of at most "
                    f"{MAX_UPSCALE:g} to resize its output (--upscale)"
                )
        refs = tuple(IdentityRef.of(i) for i in identities)
        mode = checked_mode(mode, [r.dictionary for r in refs])
        resolved = resolved_detector(detector, face_models)
        folder = retinaface_dir(face_models)
        if resolved == "retinaface" and folder is None:
            raise FaceModelsError("retinaface needs its weights in --face-models DIR or $DMDNET_FACEXLIB_DIR")
        where = pick_device(device)
        settings = cls(
            WeightsRef.of(weights),
            str(where),
            precision_name(pick_precision(precision, where)),
            mode,
            refs,
            detector=resolved,
            face_models=str(folder) if resolved == "retinaface" else None,
            bg_upsampler=None if background is None else FileRef(str(Path(bg_upsampler).resolve()), background.sha256),
            **options,
        )
        settings.check()
        return settings

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The fields :meth:`create` takes as they are (the others it resolves): a surface passes
        each of them, so a field added here is an option every surface must pass."""
        resolved = {"weights", "device", "precision", "mode", "identities", "detector", "face_models"}
        resolved |= {"bg_upsampler", "version"}
        return tuple(f.name for f in fields(cls) if f.name not in resolved)

    def check(self) -> None:
        """Values no run can use are refused up front (not found photo by photo)."""
        numbers = {"upscale": self.upscale, "strength": self.strength}
        for name, value in {**numbers, "threshold": self.threshold, "margin": self.margin}.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        upscale = f"upscale must be between 0.1 and {MAX_UPSCALE}, got {self.upscale}"
        problems = [
            (not 0.1 <= self.upscale <= MAX_UPSCALE, upscale),
            (not 0 <= self.strength <= 1, f"strength must be between 0 and 1, got {self.strength}"),
            (self.batch_size < 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.min_face < 1, f"min face must be at least 1 px, got {self.min_face}"),
            (self.max_faces is not None and self.max_faces < 1, f"max faces must be at least 1, got {self.max_faces}"),
            (self.threshold < 0 or self.margin < 0, "threshold and margin cannot be negative"),
        ]
        for wrong, message in problems:
            if wrong:
                raise ValueError(message)

    @property
    def dictionaries(self) -> tuple[IdentityDictionary, ...]:
        return tuple(r.dictionary for r in self.identities)

    def record(self) -> dict:
        """Every field as JSON, files with their paths and hashes: the report's header."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def key(self) -> str:
        """A hash of every field, files by content alone (a moved file is the same file): the journal's key."""
        record = {f.name: _plain(getattr(self, f.name), content=True) for f in fields(self)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    def restorer(self, device: str | None = None) -> Restorer:
        """The restorer these settings describe (``device``: another one, for a cluster's workers)."""
        return load_restorer(
            self.weights.source,
            device or self.device,
            self.precision,
            self.detector,
            self.face_models,
            self.dictionaries,
            threshold=self.threshold,
            margin=self.margin,
            batch_size=self.batch_size,
            min_face=self.min_face,
            only_largest=self.only_largest,
            max_faces=self.max_faces,
        )

    def background(self) -> Upsampler | None:
        """The background upsampler, on the run's device: the content recorded here, which every photo of
        the run gets (a file replaced during the run is not read while this process holds the model;
        another process finds it changed and refuses it)."""
        if self.bg_upsampler is None:
            return None
        ref = self.bg_upsampler
        return loaded_upsampler(ref.sha256, self.device) or load_upsampler(ref.path, self.device, ref.sha256)

    def face_helper(self, device: str = "cpu") -> FaceHelper:
        """The face helper alone, for a stage that only finds faces (a cluster's detect actors)."""
        return load_face_helper(
            self.detector, self.face_models, device, self.min_face, self.only_largest, self.max_faces
        )


def _plain(value: object, content: bool = False) -> object:
    """A field as JSON; ``content``: a file as its sha256 alone."""
    if isinstance(value, (WeightsRef, IdentityRef, FileRef)):
        return value.sha256 if content else value.record()
    if isinstance(value, tuple):
        return [_plain(v, content) for v in value]
    if isinstance(value, Mode):
        return value.value
    return value
