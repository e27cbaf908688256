"""What a run says about each input, and about itself: typed entries and the report file.

Every engine (the photo stream, Ray, the video loop) makes its entries here, so the report has one
shape, written down as a JSON schema in docs/cli.md and checked against real runs in the tests.
The report's header says what made the outputs (package version, device, precision, settings,
weights with their sha256), so two reports can be compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_path
from .identity import IdentityError
from .io import ImageError
from .text import printable

if TYPE_CHECKING:
    from .pipeline import ImageResult
    from .settings import RunSettings


class Status(str, Enum):
    OK = "ok"  # written, with at least one face restored
    NO_FACE = "no_face"  # written unchanged: no face was found
    UNCHANGED = "unchanged"  # written, its faces all left as they were (only-matched: none matched)
    ERROR = "error"  # not written; ``error`` says why

    @classmethod
    def written(cls, restored: bool, seen: bool) -> Status:
        """The status of a written output (photo or video): some face restored, faces seen, or none."""
        if restored:
            return cls.OK
        return cls.UNCHANGED if seen else cls.NO_FACE


@dataclass(frozen=True)
class VideoRecord:
    """What a restored video's entry adds: its timing and the faces tracked through it."""

    frames: int
    fps: float
    size: tuple[int, int]  # (width, height) as stored
    rotation: int
    audio: str | None  # "copied", or None without an audio stream
    temporal: bool
    faces_seen: int
    faces_restored: int
    tracks: tuple[dict, ...] = ()  # with ``temporal``: one per tracked person

    def to_json(self) -> dict:
        record = {
            "frames": self.frames,
            "fps": self.fps,
            "size": list(self.size),
            "rotation": self.rotation,
            "audio": self.audio,
            "temporal": self.temporal,
            "faces_seen": self.faces_seen,
            "faces_restored": self.faces_restored,
        }
        return {**record, "tracks": list(self.tracks)} if self.temporal else record

    @classmethod
    def from_json(cls, record: dict) -> VideoRecord:
        return cls(**{**record, "size": tuple(record["size"]), "tracks": tuple(record.get("tracks", ()))})


@dataclass(frozen=True)
class Entry:
    """One input's line in a report: where its output went, how it ended, and its faces."""

    input: str
    output: str | None
    status: Status
    error: str | None = None
    faces: tuple[dict, ...] = ()  # FaceResult.record() of each face found
    skipped_faces: tuple[dict, ...] = ()  # faces left out, with the reason
    video: VideoRecord | None = None

    @classmethod
    def failed(cls, src: str | Path, error: Exception | str) -> Entry:
        """An input that failed: one printable line naming the file and the problem."""
        if isinstance(error, str):
            text = error
        elif isinstance(error, (ImageError, IdentityError, OSError)):
            text = str(error) if str(src) in str(error) else f"{src}: {error}"
        else:  # an unexpected failure still names the file, and the batch goes on
            text = f"{src}: {type(error).__name__}: {error}"
        return cls(str(src), None, Status.ERROR, printable(text))

    @classmethod
    def written(cls, src: str | Path, dst: str | Path, result: ImageResult) -> Entry:
        """A photo whose output was written."""
        status = Status.written(any(f.restored is not None for f in result.faces), bool(result.faces))
        return cls(str(src), str(dst), status, None, tuple(f.record() for f in result.faces), tuple(result.skipped))

    def renamed(self, src: str, dst: str | None) -> Entry:
        """The same entry under other names (a cluster's paths shown as URIs)."""
        return Entry(src, dst, self.status, self.error, self.faces, self.skipped_faces, self.video)

    def to_json(self) -> dict:
        record: dict = {"input": self.input, "output": self.output, "status": self.status.value, "error": self.error}
        if self.status is not Status.ERROR:
            record["faces"] = list(self.faces)
        if self.skipped_faces:
            record["skipped_faces"] = list(self.skipped_faces)
        if self.video is not None:
            record["video"] = self.video.to_json()
        return record

    @classmethod
    def from_json(cls, record: dict) -> Entry:
        video = record.get("video")
        return cls(
            record["input"],
            record["output"],
            Status(record["status"]),
            record.get("error"),
            tuple(record.get("faces", ())),
            tuple(record.get("skipped_faces", ())),
            None if video is None else VideoRecord.from_json(video),
        )


REPORT_FORMAT = "dmdnet-report"
REPORT_VERSION = 2  # 2: the header (version, device, precision, settings, weights) and typed entries


@dataclass(frozen=True)
class RunReport:
    """A run's report: what made the outputs, and one entry per input in input order."""

    settings: RunSettings
    files: tuple[Entry, ...]
    engine: str = "stream"
    warnings: tuple[str, ...] = ()  # what went wrong with the run itself (its journal), not with an input

    def count(self, status: Status) -> int:
        return sum(e.status is status for e in self.files)

    @property
    def failed(self) -> bool:
        return self.count(Status.ERROR) > 0

    def to_json(self) -> dict:
        settings = self.settings.record()
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "dmdnet_version": self.settings.version,
            "engine": self.engine,
            "device": self.settings.device,
            "precision": self.settings.precision,
            "weights": settings.pop("weights"),
            "settings": settings,
            "summary": {s.value: self.count(s) for s in Status},
            "warnings": list(self.warnings),
            "files": [e.to_json() for e in self.files],
        }

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (a reader never sees half of it)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)
