"""Videos in, videos out: read with PyAV, restore the frames through the Restorer, write them back.

PyAV's wheel carries FFmpeg, so this works offline. The output keeps the input's size and frame
timing (each frame's timestamp is copied, so variable frame rates survive), its rotation (phone
videos store frames sideways with a display rotation: faces are found and restored upright) and
its audio stream, copied packet by packet without re-encoding. Frames are decoded three times (to
count them, and twice in :func:`clips.restore_clip`: to track the faces, to restore them), so a
long clip is never held in memory; decoding costs milliseconds a frame against about a second a face.
A frame larger than the photos' pixel limit is refused from the stream's header, before decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .clips import ClipProgress, restore_clip
from .identity import IdentityDictionary
from .io import IMAGE_EXTENSIONS, ImageError, Picture, check_pixels, refuse_overwrite
from .outputs import Job
from .pipeline import FaceResult, Mode, Restorer
from .report import Entry, Status, VideoRecord
from .settings import RunSettings
from .tracking import TrackSummary
from .userfiles import NotARegularFile, checked_name, unreadable

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}
INPUT_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # what a run takes from a folder, and by name
CODECS = {".webm": ("libvpx-vp9", {"crf": "30", "b:v": "0"}), ".avi": ("mpeg4", {"qscale": "2"})}
DEFAULT_CODEC = ("libx264", {"crf": "17", "preset": "medium"})  # visually lossless for most clips


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
        with checked_name(path) as name:  # FFmpeg's own open would wait on a FIFO, and read a device forever
            container = av.open(name)
    except (FileNotFoundError, IsADirectoryError, NotARegularFile) as exc:
        raise VideoError(f"{path}: {unreadable(exc)}") from None
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: not a readable video ({exc.strerror or type(exc).__name__})") from None
    except ValueError as exc:
        raise VideoError(f"{path}: not a readable video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: holds no video stream")
    context = container.streams.video[0].codec_context
    try:
        check_pixels(context.width, context.height, f"{path}: frame")
    except ImageError as exc:
        container.close()
        raise VideoError(str(exc)) from None
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


def _track_records(first_results: dict[int, FaceResult], tracks: tuple[TrackSummary, ...]) -> list[dict]:
    """One report entry per track: its frames, and the identity decided for all of them."""
    out = []
    for summary in tracks:
        result = first_results.get(summary.id)
        entry = {
            "track": summary.id,
            "frames": [summary.first, summary.last],
            "n_frames": summary.frames,
            "detected_frames": summary.detected_frames,
        }
        if result is not None:
            face = result.record()
            entry.update({k: v for k, v in face.items() if k not in ("box", "boxes_from", "track")})
        out.append(entry)
    return out


class _Frames:
    """The clip's frames, upright, each time it is called (:func:`restore_clip` reads them twice).

    Once ``sink`` is set (the restoring pass), the audio packets met on the way are copied to it,
    and each frame's stored timing is kept in ``timing`` until its restored frame is written.
    """

    def __init__(self, src: Path, info: VideoInfo) -> None:
        self.src, self.info = src, info
        self.sink: tuple | None = None  # (output container, its audio stream)
        self.timing: deque[tuple[int, Fraction]] = deque()

    def __call__(self) -> Iterator[Picture]:
        import av

        with _open(self.src) as inp:
            streams = [inp.streams.video[0], *inp.streams.audio[:1]]
            try:
                for packet in inp.demux(*streams):
                    if packet.stream.type == "audio":
                        if self.sink is not None and packet.dts is not None:
                            packet.stream = self.sink[1]
                            self.sink[0].mux(packet)
                        continue
                    for frame in packet.decode():
                        check_pixels(frame.width, frame.height, f"{self.src}: frame")  # the size may change
                        if self.sink is not None:
                            self.timing.append((frame.pts, frame.time_base))
                        yield Picture(self.info.upright(frame))
            except av.FFmpegError as exc:
                raise VideoError(f"{self.src}: broken video data ({exc})") from None


def restore_video(
    restorer: Restorer,
    src: str | Path,
    dst: str | Path,
    mode: Mode | str = Mode.AUTO,
    identities: list[IdentityDictionary] | None = None,
    temporal: bool = True,
    strength: float = 1.0,
    max_frames: int | None = None,
    progress: ClipProgress | None = None,
    keep_colours: bool = True,
) -> VideoRecord:
    """Restore every face of a video into ``dst`` (written atomically); returns what its report
    entry says of it.

    ``temporal``: faces are tracked, steadily aligned and given one identity per track; off, each
    frame is restored on its own, as a photo would be. ``max_frames``: refuse longer clips.
    ``keep_colours``: as in :meth:`Restorer.run`.
    """
    import av

    src, dst = Path(src), Path(dst)
    info = probe(src)
    if max_frames is not None and info.frames > max_frames:
        raise VideoError(f"{src}: {info.frames} frames, more than the limit of {max_frames}")
    codec, options = CODECS.get(dst.suffix.lower(), DEFAULT_CODEC)
    frames = _Frames(src, info)
    clip = restore_clip(
        restorer,
        frames,
        mode,
        identities,
        strength,
        temporal,
        float(info.rate),
        keep_colours,
        n_frames=info.frames,
        progress=progress,
    )
    first_results: dict[int, FaceResult] = {}
    counts = {"faces": 0, "restored": 0}
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
            frames.sink = (out, out.add_stream_from_template(audio_in) if audio_in is not None else None)
            for result in clip.results:
                for face in result.faces:
                    counts["faces"] += 1
                    counts["restored"] += face.restored is not None
                    if face.face.track is not None:
                        first_results.setdefault(face.face.track, face)
                new = av.VideoFrame.from_ndarray(info.stored(result.pixels), format="rgb24")
                new.pts, new.time_base = frames.timing.popleft()
                out.mux(video_out.encode(new))
            out.mux(video_out.encode(None))
    return VideoRecord(
        frames=info.frames,
        fps=round(float(info.rate), 3),
        size=info.size,
        rotation=info.rotation,
        audio="copied" if info.has_audio else None,
        temporal=temporal,
        faces_seen=counts["faces"],
        faces_restored=counts["restored"],
        tracks=tuple(_track_records(first_results, clip.tracks)) if temporal else (),
    )


def restore_video_job(
    restorer: Restorer, job: Job, settings: RunSettings, progress: ClipProgress | None = None
) -> Entry:
    """A run's video: its report entry; a failure is an error entry, and the batch goes on."""
    try:
        refuse_overwrite(Path(job.src), Path(job.dst))
        if settings.upscale != 1.0 or settings.aligned:
            raise VideoError(f"{job.src}: upscale and aligned are for photos; a video keeps its size")
        record = restore_video(
            restorer,
            job.src,
            job.dst,
            settings.mode,
            temporal=settings.temporal,
            strength=settings.strength,
            progress=progress,
            keep_colours=settings.keep_colours,
        )
    except Exception as exc:
        return Entry.failed(job.src, exc)
    status = Status.written(record.faces_restored > 0, record.faces_seen > 0)
    return Entry(job.src, job.dst, status, video=record)
