"""Flicker of restored video: per-frame restoration against tracked restoration.

    python benchmarks/video_stability.py [--faces ../shared/faces] [--frames 48] [--weights CKPT]
    python benchmarks/video_stability.py --write-example examples/video/obama_jitter.mp4

Each clip is made from a real still photo: every frame is the photo moved by a known random
similarity jitter (up to 2 px and 1 degree), then degraded the same way (blur, 2x down, noise with
a fixed seed, JPEG 60). Each clip is restored twice through the Restorer: every frame on its own
(as photos are), and tracked (``dmdnet_plugin.tracking``). The known motion of each output frame
is then undone, and flicker is the mean absolute change between consecutive frames inside the
faces (0-255 scale). "floor" is the flicker of a perfectly steady result: the still restored once,
moved with the same jitter and moved back, which leaves only the resampling. Identity switches
are counted per face through the clip (the obama clip has his identity dictionary, built from
the reference photos of other pictures).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dmdnet_plugin.clips import restore_clip  # noqa: E402
from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.io import Picture, read_image  # noqa: E402
from dmdnet_plugin.pipeline import ImageResult, Restorer  # noqa: E402
from dmdnet_plugin.weights import load_model  # noqa: E402

MAX_SHIFT, MAX_ANGLE = 2.0, 1.0  # px, degrees


def jitter(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``count`` random similarity transforms (2x3) about the frame centre."""
    rng = np.random.default_rng(seed)
    w, h = size
    out = []
    for _ in range(count):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-MAX_ANGLE, MAX_ANGLE), 1.0)
        m[:, 2] += rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2)
        out.append(m)
    return out


def degrade(rgb8: np.ndarray, blur: float = 1.5, down: int = 2, noise: float = 6, quality: int = 60) -> np.ndarray:
    """The same damage on every frame: blur, downsampling and back, noise of a fixed seed, JPEG."""
    h, w = rgb8.shape[:2]
    img = cv2.GaussianBlur(rgb8.astype(np.float32), (0, 0), blur)
    img = cv2.resize(img, (w // down, h // down), interpolation=cv2.INTER_AREA)
    img += np.random.default_rng(7).normal(0, noise, img.shape).astype(np.float32)
    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.resize(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), (w, h), interpolation=cv2.INTER_CUBIC)


def heavy(rgb8: np.ndarray) -> np.ndarray:
    """Damage under which the per-frame identity decision wavers: blur 3, 4x down, noise 8, JPEG 50."""
    return degrade(rgb8, 3.0, 4, 8, 50)


def make_clip(
    still8: np.ndarray, count: int, seed: int = 0, damage: Callable[[np.ndarray], np.ndarray] = degrade
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Jittered frames (uint8 RGB), each degraded by ``damage``, and the motion of each."""
    h, w = still8.shape[:2]
    motions = jitter(count, (w, h), seed)
    return [
        damage(cv2.warpAffine(still8, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101))
        for m in motions
    ], motions


def write_clip(frames: list[np.ndarray], path: Path, rate: int = 25, rotation: int = 0) -> None:
    """An H.264 MP4 with a quiet 440 Hz AAC track (so that the audio copy is exercised too).
    ``rotation``: store the frames turned, with a display rotation that turns them back (as phones do)."""
    import av

    frames = [np.ascontiguousarray(np.rot90(f, -(rotation // 90))) for f in frames]
    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"crf": "16"})
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        if rotation:
            video.set_display_rotation(rotation)
        audio = out.add_stream("aac", rate=44100)
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        samples = int(44100 * len(frames) / rate)
        tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(samples) / 44100)).astype(np.float32)[None]
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[:, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 44100, start, Fraction(1, 44100)
            out.mux(audio.encode(chunk))
        out.mux(video.encode(None))
        out.mux(audio.encode(None))


def steady(frames: list[np.ndarray], motions: list[np.ndarray]) -> list[np.ndarray]:
    """Each frame moved back by its known motion: a still result gives identical frames."""
    h, w = frames[0].shape[:2]
    return [
        cv2.warpAffine(f.astype(np.float32), cv2.invertAffineTransform(m), (w, h), flags=cv2.INTER_CUBIC)
        for f, m in zip(frames, motions)
    ]


def flicker(frames: list[np.ndarray], motions: list[np.ndarray], region: np.ndarray) -> float:
    """Mean absolute change between consecutive frames inside ``region``, after undoing the motion."""
    back = steady(frames, motions)
    return float(np.mean([np.abs(b - a)[region].mean() for a, b in zip(back, back[1:])]))


def identity_switches(results: list[ImageResult], key) -> int:
    """Changes of identity between consecutive frames, per face (``key`` says which face it is)."""
    seen: dict = {}
    switches = 0
    for result in results:
        for face in result.faces:
            name = None if face.identity is None else face.identity.name
            k = key(face)
            switches += k in seen and seen[k] != name
            seen[k] = name
    return switches


@dataclass
class Clip:
    name: str
    still: Path
    width: int  # the still is resized to this width
    references: list[Path]
    damage: Callable[[np.ndarray], np.ndarray] = degrade


def measure(restorer: Restorer, clip: Clip, count: int) -> dict:
    still = read_image(clip.still).rgb8()
    h, w = still.shape[:2]
    still = cv2.resize(still, (clip.width, round(h * clip.width / w) // 2 * 2), interpolation=cv2.INTER_AREA)
    h, w = still.shape[:2]
    identities = (
        [restorer.build_identity(clip.references, name=clip.name.split(",")[0], aligned=True)[0]]
        if clip.references
        else []
    )
    frames, motions = make_clip(still, count, damage=clip.damage)
    pictures = [Picture(f) for f in frames]
    centre = FaceHelper.masks(restorer.helper.detect(Picture(still).rgb()).faces, [still.shape[:2]])[0]
    region = cv2.erode((centre > 0.99).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    still_result = restorer.run([Picture(clip.damage(still))], identities=identities)[0].pixels
    rows = {
        "input": flicker(frames, motions, region),
        "floor": flicker(
            [
                cv2.warpAffine(still_result, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
                for m in motions
            ],
            motions,
            region,
        ),
    }
    per_frame = list(restore_clip(restorer, lambda: iter(pictures), identities=identities, temporal=False).results)
    tracked_clip = restore_clip(restorer, lambda: iter(pictures), identities=identities, rate=25.0)
    tracked = list(tracked_clip.results)
    rows["per-frame"] = flicker([r.pixels for r in per_frame], motions, region)
    rows["tracked"] = flicker([r.pixels for r in tracked], motions, region)
    by_place = lambda f: tuple(np.round(np.asarray(f.face.box[:2]) / 40).astype(int))  # noqa: E731
    counts = [len(r.faces) for r in per_frame]
    rows["faces per frame (per-frame)"] = f"{min(counts)}-{max(counts)}"
    rows["tracks"] = len(tracked_clip.tracks)
    rows["switches per-frame"] = identity_switches(per_frame, by_place)
    rows["switches tracked"] = identity_switches(tracked, lambda f: f.face.track)
    rows["identities tracked"] = sorted(
        {str(f.identity.name if f.identity else "generic") for r in tracked for f in r.faces}
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", default=str(ROOT.parent / "shared" / "faces"))
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--weights")
    parser.add_argument("--clips", nargs="+", metavar="NAME", help="measure only these clips (default: all)")
    parser.add_argument(
        "--write-example",
        metavar="MP4",
        help="write the example clip and stop: the already low-quality "
        "examples/photos/obama_lowres.jpg, jittered, 24 frames",
    )
    args = parser.parse_args()
    if args.write_example:
        frames, _ = make_clip(read_image(ROOT / "examples/photos/obama_lowres.jpg").rgb8(), 24, damage=lambda f: f)
        write_clip(frames, Path(args.write_example))
        return
    faces = Path(args.faces)
    obama_refs = sorted((faces / "obama" / "refs").glob("*"))
    clips = [
        Clip("obama", faces / "obama/raw_photos/o9.jpg", 640, [p for p in obama_refs if p.stem != "o9"]),
        Clip(
            "obama, heavy damage",
            faces / "obama/raw_photos/o9.jpg",
            640,
            [p for p in obama_refs if p.stem != "o9"],
            heavy,
        ),
        Clip("family", ROOT / "examples/photos/family.jpg", 436, []),
        Clip("two people", faces / "whole/Blake_Lively.jpg", 700, []),
    ]
    restorer = Restorer(load_model(args.weights, device="cpu"))
    print(restorer.loaded.notice().splitlines()[0])
    print(f"{args.frames} frames a clip, jitter up to {MAX_SHIFT} px and {MAX_ANGLE} deg; flicker in 0-255 units\n")
    header = [
        "clip",
        "input",
        "per-frame",
        "tracked",
        "floor",
        "cut",
        "faces/frame (per-frame)",
        "tracks",
        "identity switches per-frame",
        "identity switches tracked",
        "identities (tracked)",
    ]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for clip in clips:
        if args.clips and clip.name not in args.clips:
            continue
        if not clip.still.is_file():
            print(f"| {clip.name} | skipped: {clip.still} not found |")
            continue
        r = measure(restorer, clip, args.frames)
        cut = r["per-frame"] / max(r["tracked"], 1e-9)
        print(
            f"| {clip.name} | {r['input']:.2f} | {r['per-frame']:.2f} | {r['tracked']:.2f} | {r['floor']:.2f} | "
            f"{cut:.1f}x | {r['faces per frame (per-frame)']} | {r['tracks']} | {r['switches per-frame']} | "
            f"{r['switches tracked']} | {', '.join(r['identities tracked'])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
