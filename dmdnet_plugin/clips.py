"""A clip's frames through the Restorer: tracking, steady faces, and a bound on what is held.

Above the photo core (:mod:`pipeline`), which knows nothing of time: a clip is tracked first
(:mod:`tracking`: steady alignment, one identity per track), then restored
:data:`~dmdnet_plugin.pipeline.FRAMES_PER_RUN` frames at a time through the same
:meth:`Restorer.restore_faces` and :meth:`Restorer.finish` as photos, with the restored crops
smoothed over time. Videos (:mod:`video`), the ComfyUI node and the Gradio demo all call
:func:`restore_clip`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .face_helper import Detection
from .identity import IdentityDictionary
from .io import Picture
from .pipeline import FRAMES_PER_RUN, ImageResult, Mode, Restorer, checked_mode, chunks, needs_embeddings
from .tracking import CropSmoother, TrackedClip, TrackSummary, track_frames


@dataclass(frozen=True)
class ClipStatus:
    """Where a clip's run stands, for a progress bar: a video shows frames, ComfyUI shows faces."""

    stage: str  # "tracking" or "restoring"
    frames_done: int
    n_frames: int  # 0 when unknown
    faces_done: int = 0
    n_faces: int = 0  # 0 until known: after tracking, or from the detections given


ClipProgress = Callable[[ClipStatus], None]


@dataclass(frozen=True)
class RestoredClip:
    """A clip being restored: its face tracks (known before the first frame is restored; empty when
    the frames are restored on their own) and one result per frame, in order, as they are made."""

    tracks: tuple[TrackSummary, ...]
    results: Iterator[ImageResult]


def restore_clip(
    restorer: Restorer,
    frames: Callable[[], Iterable[Picture]],
    mode: Mode | str = Mode.AUTO,
    identities: Sequence[IdentityDictionary] | None = None,
    strength: float = 1.0,
    temporal: bool = True,
    rate: float = 25.0,
    keep_colours: bool = True,
    detections: Sequence[Detection] | None = None,
    n_frames: int = 0,
    progress: ClipProgress | None = None,
) -> RestoredClip:
    """Restore a clip's frames, :data:`FRAMES_PER_RUN` at a time, so a long clip is never held.

    ``frames()`` yields the frames in order; with ``temporal`` it is called twice: once to track
    the faces (steady alignment, one identity per track, smoothed crops at ``rate`` frames per
    second), then to restore. Off, each frame is restored as a photo, with ``detections`` (one per
    frame) when given. ``progress`` gets a :class:`ClipStatus` per frame and between model calls,
    so a caller can show it and cancel.
    """
    identities = restorer.checked_identities(identities)
    mode = checked_mode(mode, identities)
    if temporal and detections is not None:
        raise ValueError("a temporal clip is tracked by restore_clip; detections cannot be given")
    if detections is not None and n_frames and len(detections) != n_frames:
        raise ValueError(f"{len(detections)} detections for {n_frames} frames")
    tracked = None
    if temporal:

        def tracking() -> Iterator[np.ndarray]:
            for index, picture in enumerate(frames()):
                if progress:
                    progress(ClipStatus("tracking", index, n_frames))
                yield picture.rgb()

        tracked = track_frames(tracking(), restorer.helper, rate)
    run = _ClipRun(restorer, mode, identities, strength, keep_colours, n_frames, progress)
    return RestoredClip(() if tracked is None else tracked.tracks, run.results(frames(), tracked, detections))


@dataclass(frozen=True)
class _ClipRun:
    """A clip whose mode and identities :func:`restore_clip` has checked."""

    restorer: Restorer
    mode: Mode
    identities: tuple[IdentityDictionary, ...]
    strength: float
    keep_colours: bool
    n_frames: int
    progress: ClipProgress | None

    def _found(
        self, chunk: list[Picture], done: int, tracked: TrackedClip | None, detections: Sequence[Detection] | None
    ) -> Sequence[Detection]:
        """The faces of a run of frames: tracked, given, or found now."""
        helper = self.restorer.helper
        if tracked is not None:
            found = tracked.detections(helper, chunk, done)
        elif detections is not None:
            found = detections[done : done + len(chunk)]
        else:
            found = helper.find(chunk, embed=needs_embeddings(self.mode, self.identities))
        if len(found) != len(chunk):
            raise ValueError(f"{len(detections or ())} detections for a clip of more frames")
        return found

    def results(
        self, frames: Iterable[Picture], tracked: TrackedClip | None, detections: Sequence[Detection] | None
    ) -> Iterator[ImageResult]:
        """One result per frame, a run of frames at a time."""
        smoother = CropSmoother() if tracked is not None else None
        if tracked is not None:
            n_faces = sum(len(faces) for faces in tracked.frames)
        else:
            n_faces = 0 if detections is None else sum(len(d.faces) for d in detections)
        progress, done, faces_done = self.progress, 0, 0
        for chunk in chunks(frames, FRAMES_PER_RUN):
            found = self._found(chunk, done, tracked, detections)

            def report(faces: int, _total: int, at: int = done, before: int = faces_done) -> None:
                progress(ClipStatus("restoring", at, self.n_frames, before + faces, n_faces))

            restored = self.restorer.restore_faces(found, self.mode, self.identities, report if progress else None)
            faces_done += sum(len(d.faces) for d in found)
            for picture, detection, faces in zip(chunk, found, restored):
                result = Restorer.finish(
                    picture,
                    detection,
                    faces,
                    strength=self.strength,
                    keep_colours=self.keep_colours,
                    smoother=smoother,
                )
                done += 1
                if progress:
                    progress(ClipStatus("restoring", done, self.n_frames, faces_done, n_faces))
                yield result
