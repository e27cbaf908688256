"""Background upsampling (``--bg-upsampler``): Real-ESRGAN's files as spandrel reads them, bad files,
tiles without seams, and whole runs on real photos (tests/data/SOURCES.md, examples/)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA

pytest.importorskip("spandrel", reason='pip install "dmdnet-plugin[upscale]"')
from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: E402
from basicsr.archs.srvgg_arch import SRVGGNetCompact  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from dmdnet_plugin.align import face_mask  # noqa: E402
from dmdnet_plugin.background import Upsampler, UpsamplerError, load_upsampler  # noqa: E402
from dmdnet_plugin.cli import main  # noqa: E402
from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.faces import DlibBackend  # noqa: E402
from dmdnet_plugin.factory import load_restorer  # noqa: E402
from dmdnet_plugin.io import ImageError, read_image  # noqa: E402
from dmdnet_plugin.settings import RunSettings  # noqa: E402
from dmdnet_plugin.text import printable  # noqa: E402
from dmdnet_plugin.weights import sha256_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBAMA = ROOT / "examples" / "photos" / "obama_lowres.jpg"  # 386x232, one face
SMALL = {"num_feat": 16, "num_block": 1}  # the official layout, cut down: a photo through it takes seconds


def rrdbnet(scale: int, num_feat: int = 64, num_block: int = 23, seed: int = 0, **kwargs) -> RRDBNet:
    """Real-ESRGAN's network (basicsr's RRDBNet: RealESRGAN_x4plus.pth is scale 4, x2plus scale 2, both 64
    features and 23 blocks) with random weights. The convolutions around the residual body also carry
    each colour straight through (for x2 its pixel-unshuffled input's first sub-pixel), so the output
    is the photo with a random texture and cast, not noise: an image whose tiles can be compared, and
    plainly not a Lanczos resize."""
    torch.manual_seed(seed)
    net = RRDBNet(3, 3, scale=scale, num_feat=num_feat, num_block=num_block, **kwargs)
    with torch.no_grad():
        for name in ("conv_first", "conv_up1", "conv_up2", "conv_hr", "conv_last"):
            conv = getattr(net, name)
            conv.weight.mul_(0.3)
            conv.bias.zero_()
            for c in range(3):
                conv.weight[c, 4 * c if name == "conv_first" and scale == 2 else c, 1, 1] += 1
    return net.eval()


def save_pth(net: torch.nn.Module, path: Path) -> Path:
    """As the official Real-ESRGAN releases are saved: ``{"params_ema": state_dict}``."""
    torch.save({"params_ema": net.state_dict()}, path)
    return path


def save_safetensors(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def x2(tmp_path_factory) -> Path:
    return save_pth(rrdbnet(2, **SMALL), tmp_path_factory.mktemp("sr") / "x2.pth")


@pytest.fixture(scope="module")
def x4(tmp_path_factory) -> Path:
    return save_pth(rrdbnet(4, **SMALL), tmp_path_factory.mktemp("sr") / "x4.pth")


def run(*args: object) -> int:
    return main([str(a) for a in args])


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_the_official_layouts_load_with_their_scale(tmp_path):
    """Full-size x2 and x4 RRDBNets, as .pth (``params_ema``) and .safetensors: spandrel finds ESRGAN and the
    scale, both files give the same weights, and the model computes what basicsr's network does (the
    weights were used, not drawn)."""
    crop = torch.from_numpy(rgb(OBAMA)[40:56, 150:166].astype(np.float32) / 255).permute(2, 0, 1)[None]
    for scale in (2, 4):
        net = rrdbnet(scale, seed=scale)
        assert sum(p.numel() for p in net.parameters()) > 16_000_000  # the released size
        pth = load_upsampler(save_pth(net, tmp_path / f"x{scale}.pth"))
        st = load_upsampler(save_safetensors(net, tmp_path / f"x{scale}.safetensors"))
        for up in (pth, st):
            assert isinstance(up, Upsampler) and up.scale == scale
            assert up.model.architecture.id == "ESRGAN" and up.model.purpose == "SR"
        assert (pth.name, st.name) == (f"x{scale}.pth", f"x{scale}.safetensors")
        for a, b in zip(pth.model.model.state_dict().values(), st.model.model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        with torch.inference_mode():
            torch.testing.assert_close(pth.model(crop), net(crop).clamp(0, 1), atol=1e-5, rtol=0)


def bad_files(folder: Path, x2: Path, dmdnet: Path) -> dict[str, str]:
    """name -> the problem its one line must name. ``ran`` appears if the pickle's code ever runs."""

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(folder / 'ran')!r}, 'w').close()",)

    data = x2.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    (folder / "empty.pth").write_bytes(b"")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "page.pth").write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>\n")
    (folder / "page.safetensors").write_text("<!DOCTYPE html><html><body>Not found</body></html>\n")
    (folder / "dmdnet.safetensors").write_bytes(dmdnet.read_bytes())
    save_pth(rrdbnet(1, **SMALL), folder / "x1.pth")  # a 1x ESRGAN: restoration, no upscaling
    save_pth(rrdbnet(2, **SMALL, num_grow_ch=8), folder / "misshapen.pth")  # ESRGAN's names, other shapes
    torch.save({"params_ema": Payload()}, folder / "payload.pth")
    (folder / "bad\nerror: fake.pth").write_bytes(b"\x1b[2J")
    (folder / "folder.pth").mkdir()
    os.mkfifo(folder / "fifo.pth")  # reading it would wait for a writer forever
    (folder / "loop.pth").symlink_to("loop.pth")
    save_pth(SRVGGNetCompact(1, 1, num_feat=8, num_conv=1, upscale=2), folder / "gray.pth")  # 1 channel in
    pth = "not a readable model file (not a PyTorch checkpoint of plain tensors"
    return {
        "truncated.pth": pth,
        "empty.pth": f"{pth}: EOFError)",
        "empty.safetensors": "not a readable model file (not a safetensors file",
        "page.pth": f"{pth}: UnpicklingError)",
        "page.safetensors": "not a readable model file (not a safetensors file",
        "dmdnet.safetensors": "not a super-resolution model that spandrel knows",
        "x1.pth": "a Restoration model, not a super-resolution model (scale 2 or more)",
        "misshapen.pth": "a broken model file (RuntimeError: Error(s) in loading state_dict for RRDBNet: size mismatch",
        "payload.pth": f"{pth}: UnpicklingError)",
        "bad\nerror: fake.pth": pth,
        "folder.pth": "is a folder",
        "fifo.pth": "not a regular file",
        "loop.pth": "cannot read it (Too many levels of symbolic links)",
        "gray.pth": "a model for 1 channels in, 1 out; the background needs one for RGB (3 and 3)",
        "b" * 256 + ".pth": "cannot read it (File name too long)",
        "missing.pth": "no such file",
    }


def test_a_bad_model_file_is_one_line_in_python_and_in_the_cli(tmp_path, x2, small_weights, capsys):
    """Truncated, empty, HTML, a DMDNet checkpoint, a 1x model, tensors of the wrong shapes, a pickle
    that would run code, a name with control characters, a folder, nothing: one short line that names
    the file, no traceback, no output; the pickle's code never runs."""
    bad = tmp_path / "bad"
    bad.mkdir()
    expected = bad_files(bad, x2, small_weights)
    for name, problem in expected.items():
        shown = printable(bad / name)
        with pytest.raises(UpsamplerError) as err:
            load_upsampler(bad / name)
        message = str(err.value)
        assert message.startswith(f"{shown}: {problem}") and "\n" not in message and len(message) < 400, message
        capsys.readouterr()
        out = tmp_path / "out"
        assert run("restore", OBAMA, "-o", out, "--weights", small_weights, "--bg-upsampler", bad / name) == 2
        captured = capsys.readouterr()
        assert captured.err == f"error: {message}\n" and "Traceback" not in captured.out + captured.err
        assert not out.exists()
    assert not (bad / "ran").exists()
    torch.load(bad / "payload.pth", weights_only=False)  # the control: unpickled, the file does run code
    assert (bad / "ran").exists()


def test_tiles_leave_no_seams(x2, x4):
    """A real photo upscaled in small tiles (with context and blending) and whole agree within one level;
    without the context the same tiles leave seams, so this test can see one."""
    photo = rgb(DATA / "photos" / "family.jpg")[200:456, 60:380]  # 320x256: faces, hair, a shirt, the wall
    h, w = photo.shape[:2]
    for path in (x2, x4):
        up = load_upsampler(path)
        size = (w * up.scale, h * up.scale)
        whole = dataclasses.replace(up, tile=4096)(photo, size)
        for tile in (128, 99):  # 99: tiles that start on odd pixels, off the grid of x2's pixel unshuffle
            tiled = dataclasses.replace(up, tile=tile)(photo, size)
            assert np.abs(tiled.astype(int) - whole).max() <= 1, (path.name, tile)
        assert np.abs(whole.astype(int) - cv2.resize(photo, size, interpolation=cv2.INTER_LANCZOS4)).mean() > 5
    blind = dataclasses.replace(up, tile=128, overlap=0, context=0)(photo, size)
    assert np.abs(blind.astype(int) - whole).max() > 8  # the control: tiles that cannot see past their edges


def face_reach(original: np.ndarray, scale: float) -> np.ndarray:
    """Per output pixel, how much of a restored face the paste-back puts there (1: only the face)."""
    faces = FaceHelper(DlibBackend("hog")).detect(original.astype(np.float32) / 255).faces
    h, w = original.shape[:2]
    reach = np.zeros((round(h * scale), round(w * scale)), np.float32)
    for face in faces:
        matrix = face.matrix.copy()
        matrix[:, :2] /= scale  # as FaceHelper.paste maps the output's pixels to the crop
        np.maximum(reach, face_mask(*reach.shape, matrix), out=reach)
    return reach


def test_a_run_upscales_the_rest_with_the_model_and_pastes_faces_at_the_output_size(
    tmp_path, x2, small_weights, capsys
):
    """``--bg-upsampler x2.pth``: twice the size; away from faces the model's pixels exactly, not Lanczos's;
    the face pasted at the output size (where only the face shows, the same pixels as a Lanczos run's);
    --upscale 3 with an x2 model gives 3x; the report holds the model by sha256; new content in the same
    file restores again on resume, with the new model."""
    photo = tmp_path / "obama.png"
    cv2.imwrite(str(photo), cv2.imread(str(OBAMA)))
    original = rgb(photo)
    h, w = original.shape[:2]
    common = ("--weights", small_weights, "--precision", "fp32")
    assert run("restore", photo, "-o", tmp_path / "lanczos", "--upscale", "2", *common) == 0
    report = tmp_path / "r.json"
    assert run("restore", photo, "-o", tmp_path / "bg", "--bg-upsampler", x2, "--report", report, *common) == 0
    lanczos, restored = rgb(tmp_path / "lanczos" / "obama.png"), rgb(tmp_path / "bg" / "obama.png")
    assert restored.shape == (2 * h, 2 * w, 3)
    model = load_upsampler(x2)(original, (2 * w, 2 * h))
    reach = face_reach(original, 2)
    away, face = reach == 0, reach == 1
    assert away.mean() > 0.5 and face.sum() > 10_000
    np.testing.assert_array_equal(restored[away], model[away])
    assert np.abs(restored[away].astype(int) - lanczos[away]).mean() > 5
    np.testing.assert_array_equal(restored[face], lanczos[face])
    assert np.abs(restored[face].astype(int) - model[face]).mean() > 5  # the face is the restored one

    report = json.loads(report.read_text())
    assert report["settings"]["bg_upsampler"] == {"path": str(x2.resolve()), "sha256": sha256_of(x2)}
    assert report["settings"]["upscale"] == 2.0 and report["files"][0]["status"] == "ok"

    assert run("restore", photo, "-o", tmp_path / "x3", "--bg-upsampler", x2, "--upscale", "3", *common) == 0
    three = rgb(tmp_path / "x3" / "obama.png")
    assert three.shape == (3 * h, 3 * w, 3)
    away = face_reach(original, 3) == 0
    np.testing.assert_array_equal(three[away], load_upsampler(x2)(original, (3 * w, 3 * h))[away])

    model_file = tmp_path / "model.pth"
    model_file.write_bytes(x2.read_bytes())
    out, written = tmp_path / "resumed", tmp_path / "resumed" / "obama.png"
    assert run("restore", photo, "-o", out, "--bg-upsampler", model_file, *common) == 0
    before = written.stat().st_mtime_ns
    capsys.readouterr()
    assert run("restore", photo, "-o", out, "--bg-upsampler", model_file, *common) == 0
    assert "1 of 1 inputs already restored" in capsys.readouterr().err and written.stat().st_mtime_ns == before
    first = rgb(written)
    save_pth(rrdbnet(2, **SMALL, seed=1), model_file)  # other weights in the same file
    assert run("restore", photo, "-o", out, "--bg-upsampler", model_file, *common) == 0
    assert "already restored" not in capsys.readouterr().err and written.stat().st_mtime_ns != before
    again, away = rgb(written), reach == 0
    assert np.abs(again[away].astype(int) - first[away]).mean() > 5  # a new background, and the new model's:
    np.testing.assert_array_equal(again[away], load_upsampler(model_file)(original, (2 * w, 2 * h))[away])


def test_depth_gray_and_alpha_survive_the_model(tmp_path, x2, small_weights):
    """A 16-bit PNG stays 16-bit (with the model's own fine levels), gray stays gray, RGBA keeps its alpha
    (resized); away from faces each is the model's upscale of that very photo."""
    bgr = cv2.imread(str(OBAMA))
    h, w = bgr.shape[:2]
    src = tmp_path / "in"
    src.mkdir()
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    cv2.imwrite(str(src / "deep.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(src / "gray.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(src / "rgba.png"), np.dstack([bgr, alpha]))
    out = tmp_path / "out"
    assert run("restore", src, "-o", out, "--bg-upsampler", x2, "--weights", small_weights) == 0
    up, away = load_upsampler(x2), face_reach(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), 2) == 0
    for name, layout in (
        ("deep.png", (2 * h, 2 * w, 3)),
        ("gray.png", (2 * h, 2 * w)),
        ("rgba.png", (2 * h, 2 * w, 3)),
    ):
        picture, restored = read_image(src / name), read_image(out / name)
        assert restored.pixels.shape == layout and restored.pixels.dtype == picture.pixels.dtype, name
        np.testing.assert_array_equal(restored.pixels[away], up(picture.pixels, (2 * w, 2 * h))[away])
    deep = read_image(out / "deep.png").pixels
    assert deep.dtype == np.uint16 and len(np.unique(deep[away] % 257)) > 100  # not 8-bit levels scaled up
    rgba = cv2.imread(str(out / "rgba.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(rgba[..., 3], cv2.resize(alpha, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR))


def test_the_python_call_gives_the_cli_pixels(tmp_path, x2, small_weights):
    """``Restorer.run(..., upscale=2, background=load_upsampler(...))``: the photo the CLI writes."""
    photo = tmp_path / "obama.png"
    cv2.imwrite(str(photo), cv2.imread(str(OBAMA)))
    common = ("--weights", small_weights, "--precision", "fp32")
    assert run("restore", photo, "-o", tmp_path / "out", "--bg-upsampler", x2, *common) == 0
    restorer = load_restorer(small_weights, "cpu", "fp32")
    result = restorer.run([read_image(photo)], upscale=2, background=load_upsampler(x2))[0]
    np.testing.assert_array_equal(result.pixels, read_image(tmp_path / "out" / "obama.png").pixels)


def test_a_run_keeps_the_model_it_recorded_when_the_file_is_replaced(tmp_path, x2, x4, small_weights):
    """Every photo of a run is upscaled by the content its settings recorded (sha256): a file replaced during
    the run is not read again in this process, and another process (a Ray worker) refuses it."""
    path = tmp_path / "model.pth"
    path.write_bytes(x2.read_bytes())
    settings = RunSettings.create(small_weights, "cpu", "fp32", bg_upsampler=path)
    first = settings.background()
    assert first.sha256 == settings.bg_upsampler.sha256 == sha256_of(x2) and first.scale == settings.upscale == 2
    path.write_bytes(x4.read_bytes())
    assert settings.background() is first
    with pytest.raises(UpsamplerError, match=f"^{re.escape(str(path))}: changed since the run started"):
        load_upsampler(path, "cpu", settings.bg_upsampler.sha256)


def test_a_model_beyond_the_largest_upscale_asks_for_one(tmp_path, small_weights, capsys):
    path = save_pth(SRVGGNetCompact(3, 3, num_feat=8, num_conv=1, upscale=32), tmp_path / "x32.pth")
    assert load_upsampler(path).scale == 32
    out = tmp_path / "out"
    assert run("restore", OBAMA, "-o", out, "--weights", small_weights, "--bg-upsampler", path) == 2
    expected = f"error: {path}: a 32x model; give an upscale of at most 16 to resize its output (--upscale)\n"
    assert capsys.readouterr().err == expected and not out.exists()


def test_the_upsampler_is_loaded_again_when_its_file_changes(tmp_path, x2):
    """One process (a server, a notebook) that loads a model file, then another model saved over it, gets
    the new one: the cache knows files by content stamp, not by name alone."""
    path = tmp_path / "model.pth"
    path.write_bytes(x2.read_bytes())
    first = load_upsampler(path)
    assert load_upsampler(path) is first  # loaded once
    save_pth(rrdbnet(4, **SMALL), path)
    assert load_upsampler(path).scale == 4
    os.remove(path)
    with pytest.raises(UpsamplerError, match="no such file"):
        load_upsampler(path)


def test_the_models_output_obeys_the_pixel_limit(x4):
    """The tiles bound the model's memory, not its output, which is held whole: a 4x model on a 10 MP photo
    restored at 1x makes a 160 MP image first, and is refused before it runs."""
    photo = np.zeros((2600, 3000, 3), np.uint8)
    with pytest.raises(ImageError, match="^the x4.pth output \\(4x\\): image is 12000x10400 pixels, more than the"):
        load_upsampler(x4)(photo, (3000, 2600))
