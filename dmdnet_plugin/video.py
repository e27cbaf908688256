"""Videos in, videos out: read with PyAV, restore the frames through the Restorer, write them back.

PyAV's wheel carries FFmpeg, so this works offline. The output keeps the input's size and frame
timing (each frame's timestamp is copied, so variable frame rates survive), its rotation (phone
videos store frames sideways with a display rotation: faces are found and restored upright) and
its audio stream, copied packet by packet without re-encoding. Frames are decoded three times (to
count them, to track the faces with :mod:`tracking`, to restore and write them), so a long clip
is never held in memory; decoding costs milliseconds a frame against about a second a face.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .atomic import atomic_path
from .identity import IdentityDictionary
from .io import ImageError, Picture
from .pipeline import FaceResult, Mode, Restorer
from .tracking import CropSmoother, TrackedClip, track_frames

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}
FRAMES_PER_RUN = 8  # frames restored per Restorer.run: faces are batched across them
CODECS = {".webm": ("libvpx-vp9", {"crf": "30", "b:v": "0"}), ".avi": ("mpeg4", {"qscale": "2"})}
DEFAULT_CODEC = ("libx264", {"crf": "17", "preset": "medium"})  # visually lossless for most clips
FrameProgress = Callable[[str, int, int], None]  # (stage, frames done, frames in the clip)


class VideoError(ImageError):
    """A file that cannot be used as a video; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    rate: Fraction
    size: tuple[int, int]  # (width, height) as stored
    has_audio: bool
    rotation: int = 0  # degrees counter-clockwise that players turn the stored frames (a multiple of 90)

    def upright(self, frame) -> np.ndarray:
        """A decoded frame as RGB uint8, turned the way players show it."""
        return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), self.rotation // 90))

    def stored(self, pixels: np.ndarray) -> np.ndarray:
        """Upright pixels turned back to the stored orientation."""
        return np.ascontiguousarray(np.rot90(pixels, -(self.rotation // 90)))


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _open(path: Path):
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: not a readable video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    return container


def _decoded(path: Path) -> Iterator:
    """The video frames of ``path`` (PyAV VideoFrames); decoding errors become VideoErrors."""
    import av

    with _open(path) as container:
        try:
            yield from container.decode(container.streams.video[0])
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: broken video data ({exc})") from None


def probe(path: str | Path) -> VideoInfo:
    """Frame count (counted by decoding: containers often state none or a wrong one), rate, size."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        size, has_audio = (stream.codec_context.width, stream.codec_context.height), bool(container.streams.audio)
    frames, rotation = 0, 0
    for frame in _decoded(path):
        rotation = rotation if frames else int(round(frame.rotation / 90)) * 90 % 360
        frames += 1
    if not frames:
        raise VideoError(f"{path}: holds no decodable frame")
    return VideoInfo(frames, Fraction(rate), size, has_audio, rotation)


def track_video(path: Path, restorer: Restorer, info: VideoInfo, progress: FrameProgress | None = None) -> TrackedClip:
    """First pass: the clip's face tracks."""

    def frames() -> Iterator[np.ndarray]:
        for i, frame in enumerate(_decoded(path)):
            if progress:
                progress("tracking", i, info.frames)
            yield info.upright(frame).astype(np.float32) / 255

    return track_frames(frames(), restorer.helper, float(info.rate))


def _track_records(first_results: dict[int, FaceResult], clip: TrackedClip) -> list[dict]:
    """One report entry per track: its frames, and the identity decided for all of them."""
    out = []
    for summary in clip.tracks:
        result = first_results.get(summary.id)
        entry = {"track": summary.id, "frames": [summary.first, summary.last], "n_frames": summary.frames,
                 "detected_frames": summary.detected_frames}
        if result is not None:
            face = result.record()
            entry.update({k: v for k, v in face.items() if k not in ("box", "boxes_from", "track")})
        out.append(entry)
    return out


def restore_video(
    restorer: Restorer,
    src: str | Path,
    dst: str | Path,
    mode: Mode | str = Mode.AUTO,
    identities: list[IdentityDictionary] | None = None,
    temporal: bool = True,
    strength: float = 1.0,
    max_frames: int | None = None,
    progress: FrameProgress | None = None,
    colours: bool = True,
) -> dict:
    """Restore every face of a video into ``dst`` (written atomically); returns its report entry.

    ``temporal``: faces are tracked, steadily aligned and given one identity per track; off, each
    frame is restored on its own, as a photo would be. ``max_frames``: refuse longer clips.
    ``colours``: as in :meth:`Restorer.run`.
    """
    import av

    src, dst = Path(src), Path(dst)
    info = probe(src)
    if max_frames is not None and info.frames > max_frames:
        raise VideoError(f"{src}: {info.frames} frames, more than the limit of {max_frames}")
    clip = track_video(src, restorer, info, progress) if temporal else None
    codec, options = CODECS.get(dst.suffix.lower(), DEFAULT_CODEC)
    smoother = CropSmoother() if temporal else None
    first_results: dict[int, FaceResult] = {}
    counts = {"faces": 0, "restored": 0}

    def run(batch: list) -> list:
        pictures = [Picture(info.upright(f)) for _, f in batch]
        detections = None if clip is None else clip.detections(restorer.helper, pictures, batch[0][0])
        results = restorer.run(pictures, mode, identities, strength, detections=detections, smoother=smoother,
                               colours=colours)
        out = []
        for (index, frame), result in zip(batch, results):
            for face in result.faces:
                counts["faces"] += 1
                counts["restored"] += face.restored is not None
                if face.aligned.track is not None:
                    first_results.setdefault(face.aligned.track, face)
            new = av.VideoFrame.from_ndarray(info.stored(result.pixels), format="rgb24")
            new.pts, new.time_base = frame.pts, frame.time_base
            out.append(new)
            if progress:
                progress("restoring", index + 1, info.frames)
        return out

    with _open(src) as inp, atomic_path(dst) as tmp:
        video_in = inp.streams.video[0]
        audio_in = inp.streams.audio[0] if inp.streams.audio else None
        with av.open(str(tmp), "w") as out:
            video_out = out.add_stream(codec, rate=info.rate, options=options)
            video_out.width, video_out.height = info.size
            video_out.pix_fmt = "yuv420p" if info.size[0] % 2 == 0 and info.size[1] % 2 == 0 else "yuv444p"
            video_out.time_base = video_in.time_base
            if info.rotation:
                video_out.set_display_rotation(info.rotation)
            audio_out = out.add_stream_from_template(audio_in) if audio_in is not None else None

            def encode(frames: list) -> None:
                for frame in frames:
                    out.mux(video_out.encode(frame))

            batch, index = [], 0
            streams = [video_in] + ([audio_in] if audio_in is not None else [])
            try:
                for packet in inp.demux(*streams):
                    if packet.stream is audio_in:
                        if packet.dts is not None:
                            packet.stream = audio_out
                            out.mux(packet)
                        continue
                    for frame in packet.decode():
                        batch.append((index, frame))
                        index += 1
                        if len(batch) == FRAMES_PER_RUN:
                            encode(run(batch))
                            batch = []
                encode(run(batch) if batch else [])
                out.mux(video_out.encode(None))
            except av.FFmpegError as exc:
                raise VideoError(f"{src}: broken video data ({exc})") from None
    entry = {"frames": info.frames, "fps": round(float(info.rate), 3), "size": list(info.size),
             "rotation": info.rotation, "audio": "copied" if info.has_audio else None, "temporal": temporal,
             "faces_seen": counts["faces"], "faces_restored": counts["restored"]}
    if clip is not None:
        entry["tracks"] = _track_records(first_results, clip)
    return entry

