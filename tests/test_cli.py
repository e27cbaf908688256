"""The `dmdnet` CLI and the face pipeline on real photos (tests/data/SOURCES.md)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import cv2
import numpy as np
import pytest
from conftest import DATA, small_net
from photo_folders import CLI
from PIL import Image
from report_schema import checked

from dmdnet_plugin.align import CROP_MASK, paste_face
from dmdnet_plugin.cli import main
from dmdnet_plugin.face_helper import FaceHelper
from dmdnet_plugin.faces import DlibBackend
from dmdnet_plugin.identity import IdentityDictionary
from dmdnet_plugin.io import read_image
from dmdnet_plugin.weights import save_checkpoint, sha256_of


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    return save_checkpoint(small_net(), tmp_path_factory.mktemp("w") / "small.safetensors")


@pytest.fixture(scope="session")
def backend():
    return DlibBackend("hog")


def run(*args: str) -> int:
    return main([str(a) for a in args])


def family_png(folder):
    path = folder / "family.png"
    cv2.imwrite(str(path), cv2.imread(str(DATA / "photos" / "family.jpg")))
    return path


def two_people(folder):
    """A held-out photo of person 00005 beside a low-quality photo of person 00022."""
    left = cv2.imread(str(DATA / "celebref" / "00005" / "3.jpg"))
    right = cv2.imread(str(DATA / "lq" / "00022_14.jpg"))
    path = folder / "two_people.png"
    cv2.imwrite(str(path), np.hstack([left, right]))
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_multi_face_photo_keeps_its_background_exactly(tmp_path, weights, capsys):
    src = family_png(tmp_path)
    before = digest(src)
    assert run("restore", src, "-o", tmp_path / "out", "--weights", weights, "--report", tmp_path / "r.json") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    entry = report["files"][0]
    assert entry["status"] == "ok" and len(entry["faces"]) == 3
    original, restored = read_image(src).pixels, read_image(tmp_path / "out" / "family.png").pixels
    assert restored.shape == original.shape and restored.dtype == original.dtype
    reach = np.zeros(original.shape[:2], np.float32)  # where any face's crop can land
    faces = FaceHelper(DlibBackend("hog")).detect(original.astype(np.float32) / 255).faces
    for f in faces:
        paste_face(reach, np.ones((512, 512, 3), np.float32), f.matrix)
    far = reach == 0
    assert far.mean() > 0.5
    np.testing.assert_array_equal(restored[far], original[far])
    for face in entry["faces"]:
        x1, y1, x2, y2 = map(int, face["box"])
        assert np.abs(restored[y1:y2, x1:x2].astype(int) - original[y1:y2, x1:x2]).mean() > 1
    assert digest(src) == before


def test_paste_back_of_an_unchanged_crop_leaves_no_seam_or_colour_shift(backend):
    picture = read_image(DATA / "photos" / "family.jpg")
    helper = FaceHelper(backend)
    faces = helper.detect(picture.rgb()).faces
    pasted, _ = helper.paste(picture, [(f, f.crop) for f in faces])
    diff = np.abs(pasted.astype(int) - picture.pixels.astype(int))
    assert diff.max() <= 40 and diff.mean() < 0.2  # only bilinear resampling error, near edges
    assert abs(float((pasted.astype(float) - picture.pixels).mean())) < 0.05  # no colour shift
    assert CROP_MASK[256, 256] == 1 and CROP_MASK[0, 256] == 0


def test_identity_build_show_and_matching_in_a_two_person_photo(tmp_path, weights, capsys):
    refs = DATA / "celebref"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert (
        run(
            "identity",
            "build",
            *[refs / "00005" / f"{i}.jpg" for i in (0, 1, 2)],
            tmp_path / "nothing.txt",
            "-o",
            a,
            "--name",
            "person-00005",
            "--weights",
            weights,
        )
        == 0
    )
    assert "reference rejected" in capsys.readouterr().err
    assert (
        run(
            "identity",
            "build",
            refs / "00022" / "0.jpg",
            refs / "00022" / "1.jpg",
            "-o",
            b,
            "--name",
            "person-00022",
            "--weights",
            weights,
        )
        == 0
    )
    capsys.readouterr()
    assert run("identity", "show", a) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "person-00005" and shown["n_refs"] == "3" and shown["format"] == "dmdnet-identity"
    assert shown["embedding_damaged"] == "128-d mean of 3 references under fixed damage"
    ident = IdentityDictionary.load(a)  # damage moves the embedding, but it stays this person's
    assert 0.05 < np.linalg.norm(ident.damaged_embedding - ident.embedding) < 0.5

    photo = two_people(tmp_path)
    assert (
        run(
            "restore",
            photo,
            family_png(tmp_path),
            "-o",
            tmp_path / "out",
            "--weights",
            weights,
            "--identity",
            a,
            "--identity",
            b,
            "--report",
            tmp_path / "r.json",
        )
        == 0
    )
    files = {f["input"]: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    faces = sorted(files[str(photo)]["faces"], key=lambda f: f["box"][0])
    assert [f["identity"] for f in faces] == ["person-00005", "person-00022"]
    assert all(f["distance"] < 0.5 for f in faces)
    assert all(f["identity"] is None for f in files[str(tmp_path / "family.png")]["faces"])


def test_report_schema(tmp_path, weights):
    src = family_png(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"")
    assert (
        run(
            "restore",
            src,
            tmp_path / "broken.png",
            "-o",
            tmp_path / "out",
            "--weights",
            weights,
            "--report",
            tmp_path / "r.json",
        )
        == 1
    )
    report = checked(tmp_path / "r.json")  # the schema of docs/cli.md
    assert report["weights"]["origin"] == "--weights" and report["weights"]["sha256"] == sha256_of(weights)
    assert report["precision"] == report["settings"]["precision"] in ("fp32", "bf16")
    assert report["summary"] == {"ok": 1, "no_face": 0, "unchanged": 0, "error": 1} and report["warnings"] == []
    ok, bad = report["files"]
    assert set(ok) >= {"input", "output", "status", "error", "faces"}
    assert ok["status"] == "ok" and ok["error"] is None and ok["output"].endswith("family.png")
    for face in ok["faces"]:
        assert set(face) == {"box", "identity", "distance", "boxes_from"}
        assert len(face["box"]) == 4 and face["boxes_from"] in ("landmarks", "template")
        assert face["identity"] is None and face["distance"] is None
    assert bad["status"] == "error" and bad["output"] is None and "broken.png" in bad["error"]


def _bad_inputs(folder):
    jpeg = (DATA / "photos" / "family.jpg").read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "notes.png").write_text("this is not an image\n")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated or corrupt",
        "notes.png": "not an image",
        "tiny.png": "1x1 pixels",
    }


def test_bad_files_get_one_line_errors_and_the_batch_goes_on(tmp_path, weights, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    expected = _bad_inputs(bad)
    good = family_png(bad)
    hashes = {p.name: digest(p) for p in bad.iterdir()}
    code = run("restore", bad, "-o", tmp_path / "out", "--weights", weights, "--report", tmp_path / "r.json")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    report = {f["input"]: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    for name, problem in expected.items():
        entry = report[str(bad / name)]
        assert entry["status"] == "error" and problem in entry["error"] and name in entry["error"]
        line = next(l for l in err.splitlines() if name in l)
        assert problem in line
        assert not (tmp_path / "out" / name).exists()
    assert report[str(good)]["status"] == "ok" and (tmp_path / "out" / "family.png").exists()
    assert {p.name: digest(p) for p in bad.iterdir()} == hashes  # inputs never modified
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temporaries left


def _variants(folder):
    bgr = cv2.imread(str(DATA / "photos" / "family.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    cv2.imwrite(str(folder / "deep.png"), bgr.astype(np.uint16) * 257)
    alpha = np.tile(np.linspace(0, 255, bgr.shape[1], dtype=np.uint8), (bgr.shape[0], 1))
    cv2.imwrite(str(folder / "rgba.png"), np.dstack([bgr, alpha]))
    cv2.imwrite(str(folder / "gray.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 clockwise to display"
    rotated.save(folder / "exif.jpg", quality=95, exif=exif)
    big = np.full((6000, 8000, 3), 128, np.uint8)
    big[:5760, 2000 : 2000 + 3933] = cv2.resize(bgr, (3933, 5760), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(folder / "huge.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 80])
    Image.fromarray(np.full((300, 400, 3), (90, 140, 200), np.uint8)).save(folder / "sky.png")


def test_unusual_photos_keep_depth_alpha_gray_and_orientation(tmp_path, weights):
    src = tmp_path / "in"
    src.mkdir()
    _variants(src)
    out = tmp_path / "out"
    assert run("restore", src, "-o", out, "--weights", weights, "--report", tmp_path / "r.json") == 0
    report = {f["input"].split("/")[-1]: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    for name in ("deep.png", "rgba.png", "gray.png", "cmyk.jpg", "exif.jpg", "huge.jpg"):
        assert report[name]["status"] == "ok" and len(report[name]["faces"]) >= 2, (name, report[name])
    deep = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (640, 437, 3)
    assert len(np.unique(deep % 257)) > 1  # real 16-bit values where faces were restored
    rgba = cv2.imread(str(out / "rgba.png"), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (640, 437, 4)
    np.testing.assert_array_equal(rgba[..., 3], cv2.imread(str(src / "rgba.png"), cv2.IMREAD_UNCHANGED)[..., 3])
    assert cv2.imread(str(out / "gray.png"), cv2.IMREAD_UNCHANGED).ndim == 2
    assert Image.open(out / "exif.jpg").size == (437, 640)  # displayed upright
    assert Image.open(out / "huge.jpg").size == (8000, 6000)
    assert report["sky.png"]["status"] == "no_face" and report["sky.png"]["faces"] == []
    np.testing.assert_array_equal(read_image(out / "sky.png").pixels, read_image(src / "sky.png").pixels)


def test_aligned_crops_upscale_and_saved_faces(tmp_path, weights):
    noise = (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "noise.png"), noise)
    crop = DATA / "celebref" / "00005" / "3.jpg"
    assert (
        run(
            "restore",
            crop,
            tmp_path / "noise.png",
            "-o",
            tmp_path / "out",
            "--aligned",
            "--weights",
            weights,
            "--report",
            tmp_path / "r.json",
            "--save-faces",
        )
        == 0
    )
    report = {f["input"]: f for f in json.loads((tmp_path / "r.json").read_text())["files"]}
    assert report[str(crop)]["faces"][0]["boxes_from"] == "landmarks"
    assert report[str(tmp_path / "noise.png")]["faces"][0]["boxes_from"] == "template"
    assert cv2.imread(str(tmp_path / "out" / "3.jpg")).shape == (512, 512, 3)
    assert (tmp_path / "out" / "restored_faces" / "3_00.png").exists()
    assert (tmp_path / "out" / "cropped_faces" / "3_00.png").exists()
    assert (
        run(
            "restore",
            crop,
            "-o",
            tmp_path / "own",
            "--aligned",
            "--weights",
            weights,
            "--save-faces",
            "--no-keep-colours",
        )
        == 0
    )

    def low(p):
        return cv2.GaussianBlur(cv2.imread(str(p)).astype(float), (0, 0), 16)

    drift = {d: np.abs(low(tmp_path / d / "restored_faces" / "3_00.png") - low(crop)).mean() for d in ("out", "own")}
    assert drift["out"] < drift["own"] / 3, drift  # by default the crop's broad colours; --no-keep-colours: the model's
    assert (
        run("restore", DATA / "photos" / "family.jpg", "-o", tmp_path / "up", "--upscale", "2", "--weights", weights)
        == 0
    )
    assert cv2.imread(str(tmp_path / "up" / "family.jpg")).shape == (1280, 874, 3)


def test_output_never_overwrites_the_input(tmp_path, weights, capsys):
    src = family_png(tmp_path)
    before = digest(src)
    assert run("restore", src, "-o", tmp_path, "--weights", weights) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert digest(src) == before


def test_console_script_offline_runs_the_bundled_demo_and_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DMDNET_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    photo, out = str(DATA / "photos" / "family.jpg"), str(tmp_path / "o")

    def restore(*options: str) -> subprocess.CompletedProcess:
        command = [*CLI, "restore", photo, "-o", out, *options]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    proc = restore("--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert "dmdnet_demo.safetensors (bundled demo)" in proc.stderr and "dmdnet weights download" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["weights"]["origin"] == "bundled demo" and report["weights"]["demo"] is True
    assert report["files"][0]["status"] == "ok" and (tmp_path / "o" / "family.jpg").is_file()
    proc = restore("--weights", str(tmp_path / "nope.pth"))
    assert proc.returncode == 2
    assert "nope.pth: weights file not found" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_retinaface_backend_loads_its_weights_from_the_folder(tmp_path, monkeypatch):
    """facexlib's RetinaFace with weights made here (the real ones cannot be downloaded offline)."""
    retinaface = pytest.importorskip("facexlib.detection.retinaface")
    import torch

    from dmdnet_plugin.faces import FaceModelsError, RetinaFaceBackend, get_backend

    torch.manual_seed(0)
    net = retinaface.RetinaFace(network_name="mobile0.25", half=False, device="cpu")
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "detection_mobilenet0.25_Final.pth")
    backend = get_backend("auto", tmp_path)
    assert isinstance(backend, RetinaFaceBackend) and backend.name == "retinaface_mobile0.25"
    monkeypatch.setenv("DMDNET_FACEXLIB_DIR", str(tmp_path))
    assert get_backend("retinaface").name == "retinaface_mobile0.25"
    rgb = read_image(DATA / "photos" / "family.jpg").rgb8()
    boxes = backend._boxes(rgb)  # random weights: any number of boxes, but real ones
    assert all(b.shape == (4,) and 0.8 <= s <= 1 for b, s in boxes)
    assert torch.equal(backend._net.state_dict()["body.stage1.0.0.weight"], net.state_dict()["body.stage1.0.0.weight"])
    (tmp_path / "detection_mobilenet0.25_Final.pth").write_bytes(b"truncated")
    with pytest.raises(FaceModelsError, match="not usable RetinaFace weights"):
        get_backend("retinaface", tmp_path)
    monkeypatch.delenv("DMDNET_FACEXLIB_DIR")
    with pytest.raises(
        FaceModelsError, match="retinaface needs detection_Resnet50_Final.pth or detection_mobilenet0.25"
    ):
        get_backend("retinaface", tmp_path / "empty")
    assert get_backend("auto", tmp_path / "empty").name == "dlib-hog"


def test_only_matched_mode_leaves_strangers_as_they_were(tmp_path, weights):
    photo = two_people(tmp_path)
    ident = tmp_path / "p5.safetensors"
    refs = [DATA / "celebref" / "00005" / f"{i}.jpg" for i in (0, 1, 2)]
    assert run("identity", "build", *refs, "-o", ident, "--name", "p5", "--weights", weights) == 0
    assert (
        run(
            "restore",
            photo,
            "-o",
            tmp_path / "out",
            "--weights",
            weights,
            "--identity",
            ident,
            "--mode",
            "only-matched",
            "--report",
            tmp_path / "r.json",
        )
        == 0
    )
    left, right = sorted(json.loads((tmp_path / "r.json").read_text())["files"][0]["faces"], key=lambda f: f["box"][0])
    assert left["identity"] == "p5" and "left_as_is" not in left
    assert right["identity"] is None
    assert re.fullmatch(
        r"no identity matched: too far: the nearest is at 0\.\d+, above the threshold 0\.52; "
        r"with the damaged references, too far: the nearest is at 0\.\d+, above the threshold 0\.4",
        right["left_as_is"],
    ), right["left_as_is"]
    assert right["match_damaged_distance"] > 0.4 and left["match_damaged_margin"] is None
    assert left["match_decision"] == "matched" and left["match_margin"] is None  # one identity: no runner-up
    x1, y1, x2, y2 = map(int, right["box"])
    before, after = read_image(photo).pixels, read_image(tmp_path / "out" / photo.name).pixels
    np.testing.assert_array_equal(after[y1:y2, x1 + 40 : x2], before[y1:y2, x1 + 40 : x2])
    assert run("restore", photo, "-o", tmp_path / "out4", "--weights", weights, "--mode", "only-matched") == 2
    assert run("restore", photo, "-o", tmp_path / "out2", "--weights", weights, "--mode", "identity") == 2
