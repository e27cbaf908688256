"""Video: tracks, steady restoration and the CLI on real MP4 files made from the example photos."""

from __future__ import annotations

import json
import os
import sys

import av
import cv2
import numpy as np
import pytest
from conftest import DATA

sys.path.insert(0, str(DATA.parents[1] / "benchmarks"))
from video_stability import degrade, flicker, make_clip, write_clip  # noqa: E402

from dmdnet_plugin.cli import main  # noqa: E402
from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.io import Picture, read_image  # noqa: E402
from dmdnet_plugin.pipeline import Restorer  # noqa: E402
from dmdnet_plugin.tracking import CHANGE_HIGH, CropSmoother, track_frames  # noqa: E402
from dmdnet_plugin.weights import BUNDLED, load_model  # noqa: E402

EXAMPLES = DATA.parents[1] / "examples"
STILL = EXAMPLES / "photos" / "obama_lowres.jpg"  # already low quality: the clips add only motion


@pytest.fixture(scope="module")
def restorer():
    return Restorer(load_model(BUNDLED, device="cpu"))


@pytest.fixture(scope="module")
def obama(restorer):
    return restorer.build_identity(sorted((EXAMPLES / "refs" / "obama").glob("*.jpg")), name="obama", aligned=True)[0]


def streams(path) -> dict:
    with av.open(str(path)) as c:
        video = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video)]
        c.seek(0)
        audio = sum(1 for p in c.demux(c.streams.audio[0]) if p.dts is not None) if c.streams.audio else 0
        return {
            "frames": frames,
            "rate": video.average_rate,
            "size": (video.codec_context.width, video.codec_context.height),
            "audio_packets": audio,
        }


def test_cli_restores_a_video_keeping_its_rate_size_and_audio(tmp_path, obama, capsys):
    frames, _ = make_clip(read_image(STILL).rgb8(), 8, damage=lambda f: f)
    clip = tmp_path / "clip.mp4"
    write_clip(frames, clip)
    obama.save(tmp_path / "obama.safetensors")
    before = clip.read_bytes()
    command = ["restore", str(clip), "-o", str(tmp_path / "out"), "--identity", str(tmp_path / "obama.safetensors")]
    command += ["--weights", str(BUNDLED), "--report", str(tmp_path / "r.json")]
    code = main(command)
    assert code == 0 and clip.read_bytes() == before
    src, out = streams(clip), streams(tmp_path / "out" / "clip.mp4")
    assert len(out["frames"]) == 8 and out["rate"] == src["rate"] == 25 and out["size"] == src["size"] == (386, 232)
    assert out["audio_packets"] == src["audio_packets"] > 0
    entry = json.loads((tmp_path / "r.json").read_text())["files"][0]
    video = entry["video"]
    assert entry["status"] == "ok" and video["audio"] == "copied" and video["faces_restored"] == 8
    umask = os.umask(0)
    os.umask(umask)
    for written in ("obama.safetensors", "r.json", "out/clip.mp4"):  # atomic writes keep the usual file mode
        assert (tmp_path / written).stat().st_mode & 0o777 == 0o666 & ~umask, written
    (track,) = video["tracks"]  # one person, one track, one identity for all of its frames
    assert track["frames"] == [0, 7] and track["identity"] == "obama" and track["distance"] < 0.55
    face = (slice(40, 150), slice(150, 260))  # the face moved by at most 2 px
    changed = np.abs(out["frames"][4][face].astype(int) - src["frames"][4][face]).mean()
    assert changed > 2, "the face was not restored"

    written = (tmp_path / "out" / "clip.mp4").stat().st_mtime_ns  # journaled: the same command keeps it
    capsys.readouterr()
    assert main(command) == 0 and (tmp_path / "out" / "clip.mp4").stat().st_mtime_ns == written
    assert "1 of 1 inputs already restored by an earlier run" in capsys.readouterr().err


def test_phone_videos_are_restored_upright_and_keep_their_rotation(tmp_path):
    """Phones store frames sideways with a display rotation; a sideways face is not found."""
    frames, _ = make_clip(read_image(STILL).rgb8(), 3, damage=lambda f: f)
    write_clip(frames, tmp_path / "phone.mp4", rotation=90)
    assert (
        main(
            [
                "restore",
                str(tmp_path / "phone.mp4"),
                "-o",
                str(tmp_path / "out"),
                "--weights",
                str(BUNDLED),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    video = json.loads((tmp_path / "r.json").read_text())["files"][0]["video"]
    assert video["rotation"] == 90 and video["size"] == [232, 386] and video["faces_restored"] == 3
    with av.open(str(tmp_path / "out" / "phone.mp4")) as out:
        first = next(out.decode(video=0))
        assert first.rotation == 90 and (first.width, first.height) == (232, 386)


def test_broken_videos_get_one_line_errors_and_the_batch_goes_on(tmp_path, capsys):
    frames, _ = make_clip(read_image(STILL).rgb8(), 4, damage=lambda f: f)
    write_clip(frames, tmp_path / "good.mp4")
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "text.mp4").write_text("not a video\n")
    (tmp_path / "in" / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "in" / "empty.mov").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "in" / "photo.png"), cv2.imread(str(STILL)))
    code = main(
        [
            "restore",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "--weights",
            str(BUNDLED),
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(".mp4" in e or ".mov" in e for e in errors), errors
    assert "Traceback" not in "".join(errors)
    report = {e["input"].rsplit("/", 1)[1]: e for e in json.loads((tmp_path / "r.json").read_text())["files"]}
    assert report["photo.png"]["status"] == "ok"
    assert {report[n]["status"] for n in ("text.mp4", "truncated.mp4", "empty.mov")} == {"error"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.png"]  # nothing half-written


def test_tracked_restoration_flickers_less_and_keeps_one_identity(restorer):
    """A real face, moved by a small jitter and degraded the same way in every frame (the benchmark's
    clip, shorter and smaller)."""
    still = cv2.resize(
        read_image(DATA / "celebref" / "00005" / "3.jpg").rgb8(), (320, 320), interpolation=cv2.INTER_AREA
    )
    person = restorer.build_identity([DATA / "celebref" / "00005" / f"{i}.jpg" for i in (0, 1, 2)], "00005", True)[0]
    frames, motions = make_clip(still, 8, damage=degrade)
    pictures = [Picture(f) for f in frames]
    region = FaceHelper.masks(restorer.helper.detect(Picture(still).rgb()).faces, [still.shape[:2]])[0] > 0.99
    per_frame = restorer.run(pictures, identities=[person])
    clip = track_frames((p.rgb() for p in pictures), restorer.helper)
    tracked = restorer.run(
        pictures, identities=[person], detections=clip.detections(restorer.helper, pictures), smoother=CropSmoother()
    )
    steady, unsteady = (flicker([r.pixels for r in rs], motions, region) for rs in (tracked, per_frame))
    print(f"flicker per-frame {unsteady:.2f}, tracked {steady:.2f}")
    assert steady < unsteady / 2, (steady, unsteady)
    assert len(clip.tracks) == 1 and {f.identity.name for r in tracked for f in r.faces} == {"00005"}


def test_tracks_start_and_end_with_the_faces(restorer):
    """Three people; one is covered for the first frames, another for the last: their tracks
    start and end there, and no frame holds a face that is not in it."""
    still = read_image(DATA / "photos" / "family.jpg").rgb8()
    faces = sorted(restorer.helper.detect(Picture(still).rgb()).faces, key=lambda f: f.face.box[0])
    assert len(faces) == 3
    frames = []
    for i in range(8):
        frame = still.copy()
        for face, hidden in ((faces[0], i < 3), (faces[2], i >= 6)):
            if hidden:
                x1, y1, x2, y2 = face.face.box.astype(int)
                frame[y1 - 20 : y2 + 20, x1 - 20 : x2 + 20] = 128
        frames.append(frame)
    clip = track_frames((Picture(f).rgb() for f in frames), restorer.helper)
    spans = sorted((t.first, t.last) for t in clip.tracks)
    assert spans == [(0, 5), (0, 7), (3, 7)], spans
    assert [len(f) for f in clip.frames] == [2, 2, 2, 3, 3, 3, 2, 2]


def test_smoother_damps_flicker_and_follows_a_real_change():
    """On real aligned photos: small frame-to-frame noise is damped; a different photo of the
    person (a real change of expression and light) is taken at once."""
    first, second = (read_image(EXAMPLES / "refs" / "obama" / f"o{i}.jpg").rgb() for i in (1, 2))
    rng = np.random.default_rng(0)
    smoother, raw, smoothed = CropSmoother(), [], []
    for _ in range(12):
        noisy = np.clip(first + rng.normal(0, 0.01, first.shape), 0, 1).astype(np.float32)
        raw.append(noisy)
        smoothed.append(smoother(0, noisy))
    change = lambda frames: np.mean([np.abs(b - a).mean() for a, b in zip(frames[4:], frames[5:])])  # noqa: E731
    assert change(smoothed) < change(raw) / 3
    after = smoother(0, second)
    residual = cv2.GaussianBlur(np.abs(after - second).mean(axis=2), (0, 0), 2.0)
    assert residual.mean() < 0.01 and residual.max() < CHANGE_HIGH / 2
    assert smoother(1, second) is second  # another track starts from its own first crop
