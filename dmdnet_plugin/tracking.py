"""Faces across a clip's frames: tracks, steady alignment and one identity per track.

Restoring each frame on its own makes faces flicker: the detector's landmarks move by a pixel or
two from frame to frame, so each crop is aligned a little differently, and a face can match a
different identity in the next frame. Here faces are linked into tracks (box overlap and
embedding distance). Within a track, the face's motion between frames is measured by optical
flow on the face itself, which is far steadier than the landmarks; the landmarks are mapped into
the track's first frame with that motion, smoothed there with a One Euro filter run forwards and
backwards (so it does not lag), and mapped back. A frame where the detector misses a face keeps
it, carried by the measured motion. Each track's identity is decided once, from the mean of its
frames' embeddings: no identity switch inside a track.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from .align import five_points
from .face_helper import Detection, FaceHelper
from .faces import Face
from .io import Picture, to_uint8

LINK_IOU = 0.3  # a face continues a track when its box overlaps the track's predicted box this much
LINK_DISTANCE = 0.6  # and its embedding is at most this far from the track's mean (dlib's same-person bound),
SAME_PLACE_IOU = 0.5  # or it overlaps this much: two faces cannot be in one place (small faces embed noisily)
MAX_COAST_SECONDS = 1.0  # how long a track is carried by its motion alone while the detector misses the face
MIN_FLOW_POINTS = 8  # fewer tracked points than this: the motion comes from the landmarks instead
# One Euro filter (Casiez et al., CHI 2012) in the track's first frame, where a still face does not move:
# jitter below MIN_CUTOFF Hz is removed; BETA lets fast changes (expressions, flow drift) through.
MIN_CUTOFF = 0.5
BETA = 0.05
D_CUTOFF = 1.0
# Restored crops of a track are blended over time in the aligned crop, per pixel: a change smaller than
# CHANGE_LOW (0-1 scale, after a slight blur) is flicker and only NEW_WEIGHT of it is taken; a change
# above CHANGE_HIGH (a blink, a mouth opening, a turn) is real and taken whole, at once.
NEW_WEIGHT = 0.25
CHANGE_LOW, CHANGE_HIGH = 0.02, 0.08


def _alpha(cutoff: np.ndarray | float, rate: float) -> np.ndarray | float:
    tau = 1.0 / (2 * np.pi * cutoff)
    return 1.0 / (1.0 + tau * rate)


def one_euro(
    signal: np.ndarray, rate: float, min_cutoff: float = MIN_CUTOFF, beta: float = BETA, d_cutoff: float = D_CUTOFF
) -> np.ndarray:
    """One Euro filter along axis 0 of ``signal`` (T, ...), sampled at ``rate`` frames per second."""
    out = np.empty_like(signal, dtype=np.float64)
    out[0] = signal[0]
    speed = np.zeros_like(signal[0], dtype=np.float64)
    for t in range(1, len(signal)):
        raw_speed = (signal[t] - out[t - 1]) * rate
        speed += _alpha(d_cutoff, rate) * (raw_speed - speed)
        a = _alpha(min_cutoff + beta * np.abs(speed), rate)
        out[t] = out[t - 1] + a * (signal[t] - out[t - 1])
    return out


def smooth(signal: np.ndarray, rate: float) -> np.ndarray:
    """Forwards and backwards One Euro, averaged: the lag of one direction cancels the other's."""
    if len(signal) < 3:
        return np.asarray(signal, dtype=np.float64)
    return (one_euro(signal, rate) + one_euro(signal[::-1], rate)[::-1]) / 2


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def _apply(points: np.ndarray, matrix3: np.ndarray) -> np.ndarray:
    return points @ matrix3[:2, :2].T + matrix3[:2, 2]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def flow_motion(prev_gray: np.ndarray, gray: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """Similarity transform (2x3) taking the face inside ``box`` from ``prev_gray`` to ``gray``, by
    pyramidal Lucas-Kanade on corners of the face, kept only where forward and backward flow agree."""
    h, w = gray.shape
    x1, y1, x2, y2 = box
    pad = 0.15 * (x2 - x1)
    mask = np.zeros_like(gray)
    mask[max(0, int(y1 - pad)) : min(h, int(y2 + pad)), max(0, int(x1 - pad)) : min(w, int(x2 + pad))] = 255
    points = cv2.goodFeaturesToTrack(prev_gray, maxCorners=150, qualityLevel=0.005, minDistance=4, mask=mask)
    if points is None or len(points) < MIN_FLOW_POINTS:
        return None
    params = dict(winSize=(21, 21), maxLevel=3, criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    moved, ok, _ = cv2.calcOpticalFlowPyrLK(prev_gray, gray, points, None, **params)
    back, ok_back, _ = cv2.calcOpticalFlowPyrLK(gray, prev_gray, moved, None, **params)
    good = (ok[:, 0] == 1) & (ok_back[:, 0] == 1) & (np.linalg.norm(back - points, axis=2)[:, 0] < 0.5)
    if good.sum() < MIN_FLOW_POINTS:
        return None
    matrix, inliers = cv2.estimateAffinePartial2D(
        points[good], moved[good], method=cv2.RANSAC, ransacReprojThreshold=1.0
    )
    if matrix is None or inliers.sum() < MIN_FLOW_POINTS:
        return None
    return matrix


@dataclass
class _Track:
    """A face being followed: per frame, its landmarks (detected or carried by the motion) and the
    transform from that frame's pixels to the track's first frame."""

    id: int
    frames: list[int] = field(default_factory=list)
    detected: list[Face | None] = field(default_factory=list)  # None where the motion carried it
    landmarks: list[np.ndarray] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    to_first: list[np.ndarray] = field(default_factory=list)  # 3x3
    _embedding_sum: np.ndarray | None = None
    _embedded: int = 0

    @property
    def misses(self) -> int:
        """Frames since the detector last saw this face."""
        return next((i for i, f in enumerate(reversed(self.detected)) if f is not None), len(self.detected))

    def embedding(self) -> np.ndarray | None:
        """The mean embedding of the frames where the face was detected."""
        return None if self._embedding_sum is None else self._embedding_sum / self._embedded

    def _seen(self, face: Face) -> None:
        if face.embedding is not None:
            total = self._embedding_sum
            self._embedding_sum = face.embedding.copy() if total is None else total + face.embedding
            self._embedded += 1

    @classmethod
    def start(cls, id: int, frame: int, face: Face) -> _Track:
        track = cls(id, [frame], [face], [face.landmarks], [face.box], [np.eye(3)])
        track._seen(face)
        return track

    def add(self, frame: int, motion: np.ndarray | None, face: Face | None) -> None:
        """Append a frame: ``motion`` (2x3, previous frame -> this one; None: unknown), ``face`` as
        detected, or None to carry the face by the motion."""
        previous = self.landmarks[-1]
        if motion is None and face is not None:  # no flow: the landmarks themselves tell the motion
            motion, _ = cv2.estimateAffinePartial2D(five_points(previous), five_points(face.landmarks))
        motion3 = _homogeneous(motion) if motion is not None else np.eye(3)
        self.frames.append(frame)
        self.detected.append(face)
        if face is not None:
            self._seen(face)
        self.landmarks.append(face.landmarks if face is not None else _apply(previous, motion3))
        self.boxes.append(face.box if face is not None else _moved_box(self.boxes[-1], motion3))
        self.to_first.append(self.to_first[-1] @ np.linalg.inv(motion3))


def _moved_box(box: np.ndarray, matrix3: np.ndarray) -> np.ndarray:
    corners = _apply(np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]]), matrix3)
    return np.concatenate([corners.min(0), corners.max(0)])


@dataclass(frozen=True)
class TrackSummary:
    """A finished track, for reports: where it is, how much of it the detector saw."""

    id: int
    first: int
    last: int
    detected_frames: int

    @property
    def frames(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class TrackedClip:
    """Per frame, the (track id, face) pairs to restore: smoothed landmarks, the track's mean embedding."""

    frames: tuple[tuple[tuple[int, Face], ...], ...]
    tracks: tuple[TrackSummary, ...]

    def detections(self, helper: FaceHelper, pictures: Sequence[Picture], first: int = 0) -> list[Detection]:
        """The faces of frames ``first, first + 1, ...`` (``pictures``) aligned with their steady
        landmarks: ``Restorer.run(pictures, detections=...)`` restores them."""
        return [
            Detection(
                tuple(replace(helper.align(p.rgb(), face, i), track=track) for track, face in self.frames[first + i])
            )
            for i, p in enumerate(pictures)
        ]


class FaceTracker:
    """Feed a clip's frames in order (:meth:`add`), then :meth:`finish` for the tracks.

    Holds only the previous frame (gray) and each track's landmarks, so a long video is tracked in
    one pass without keeping its frames. ``rate``: frames per second, for the smoothing filter.
    """

    def __init__(self, helper: FaceHelper, rate: float = 25.0) -> None:
        self.helper = helper
        self.rate = rate
        self.max_coast = max(1, round(MAX_COAST_SECONDS * rate))
        self.count = 0
        self._prev: np.ndarray | None = None
        self._active: list[_Track] = []
        self._done: list[_Track] = []
        self._next_id = 0

    def add(self, rgb: np.ndarray) -> None:
        """Detect the faces of the next frame (float RGB in [0, 1]) and link them to the tracks."""
        index, rgb8 = self.count, to_uint8(rgb)
        gray = cv2.cvtColor(rgb8, cv2.COLOR_RGB2GRAY)
        faces, _ = self.helper.select(rgb8)
        motions = [None if self._prev is None else flow_motion(self._prev, gray, t.boxes[-1]) for t in self._active]
        predicted = [
            t.boxes[-1] if m is None else _moved_box(t.boxes[-1], _homogeneous(m))
            for t, m in zip(self._active, motions)
        ]
        pairs = sorted(
            ((iou(box, face.box), ti, fi) for ti, box in enumerate(predicted) for fi, face in enumerate(faces)),
            reverse=True,
        )
        linked: dict[int, int] = {}
        for overlap, ti, fi in pairs:
            if overlap < LINK_IOU or ti in linked or fi in linked.values():
                continue
            mean, emb = self._active[ti].embedding(), faces[fi].embedding
            if (
                overlap < SAME_PLACE_IOU
                and mean is not None
                and emb is not None
                and np.linalg.norm(emb - mean) > LINK_DISTANCE
            ):
                continue
            linked[ti] = fi
        still = []
        for ti, track in enumerate(self._active):
            if ti in linked or track.misses < self.max_coast:
                track.add(index, motions[ti], faces[linked[ti]] if ti in linked else None)
                still.append(track)
            else:
                self._done.append(track)
        for fi, face in enumerate(faces):
            if fi not in linked.values():
                still.append(_Track.start(self._next_id, index, face))
                self._next_id += 1
        self._active, self._prev = still, gray
        self.count += 1

    def finish(self) -> TrackedClip:
        """Smooth every track and give each frame its faces; frames carried after a face's last
        detection are dropped (the face has left, or is hidden)."""
        frames: list[list[tuple[int, Face]]] = [[] for _ in range(self.count)]
        summaries = []
        for track in sorted(self._done + self._active, key=lambda t: t.id):
            keep = len(track.frames) - track.misses
            embedding = track.embedding()
            stable = np.stack([_apply(lm, m) for lm, m in zip(track.landmarks[:keep], track.to_first[:keep])])
            stable = smooth(stable.reshape(keep, -1), self.rate).reshape(stable.shape)
            for i in range(keep):
                seen = track.detected[i]
                landmarks = _apply(stable[i], np.linalg.inv(track.to_first[i]))
                face = Face(track.boxes[i], landmarks, seen.score if seen is not None else 0.0, embedding)
                frames[track.frames[i]].append((track.id, face))
            summaries.append(
                TrackSummary(
                    track.id, track.frames[0], track.frames[keep - 1], sum(f is not None for f in track.detected)
                )
            )
        return TrackedClip(tuple(tuple(f) for f in frames), tuple(summaries))


class CropSmoother:
    """Per track, a recursive filter over restored crops: steady where frames differ by flicker,
    immediate where the face really changes. Feed each track's crops in frame order."""

    def __init__(self) -> None:
        self._last: dict[int, np.ndarray] = {}

    def __call__(self, track: int, crop: np.ndarray) -> np.ndarray:
        previous = self._last.get(track)
        if previous is None:
            out = crop
        else:
            change = cv2.GaussianBlur(np.abs(crop - previous).mean(axis=2), (0, 0), 2.0)
            weight = NEW_WEIGHT + (1 - NEW_WEIGHT) * np.clip((change - CHANGE_LOW) / (CHANGE_HIGH - CHANGE_LOW), 0, 1)
            out = (previous + weight[..., None] * (crop - previous)).astype(crop.dtype)
        self._last[track] = out
        return out


def track_frames(frames: Iterable[np.ndarray], helper: FaceHelper, rate: float = 25.0) -> TrackedClip:
    """Track the faces of a sequence of float RGB frames."""
    tracker = FaceTracker(helper, rate)
    for rgb in frames:
        tracker.add(rgb)
    return tracker.finish()
