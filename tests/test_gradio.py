"""The Gradio demo: its functions, the launched app through gradio_client, and a real browser."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import urllib.request
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import small_net
from parity_inputs import load_parity_inputs

gr = pytest.importorskip("gradio")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from load_gradio import peak_rss_mb, run_load, serve, summary  # noqa: E402

import gradio_app  # noqa: E402
from dmdnet_plugin import IdentityDictionary  # noqa: E402
from dmdnet_plugin.face_helper import MIN_FACE  # noqa: E402
from dmdnet_plugin.io import MAX_PIXELS  # noqa: E402
from dmdnet_plugin.weights import save_checkpoint  # noqa: E402

PHOTO = ROOT / "examples" / "photos" / "obama_lowres.jpg"
REFS = sorted(str(p) for p in (ROOT / "examples" / "refs" / "obama").glob("*.jpg"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_checkpoint(small_net(), tmp_path_factory.mktemp("w") / "small.safetensors")


@pytest.fixture
def app(weights):
    return gradio_app.Demo(str(weights), "cpu", precision="fp32")  # bit-equal results across calls on any CPU


def call(app, photo, refs=None, identity=None, mode="auto", upscale=1.0, strength=1.0, largest=False, **options):
    return app.restore(
        str(photo) if photo else None,
        refs,
        identity,
        mode,
        upscale,
        strength,
        largest,
        **options,
        progress=lambda *a, **k: None,
    )


def test_photo_with_references_gives_both_results_and_downloads(app):
    (before, after), generic, specific, crops, result_file, identity_file, message = call(app, PHOTO, REFS)
    h, w = cv2.imread(str(PHOTO)).shape[:2]
    assert before.shape == after.shape == generic.shape == specific.shape == (h, w, 3)
    assert not np.array_equal(generic, specific)
    assert len(crops) == 1 and crops[0][0].shape == (512, 512, 3)
    assert cv2.imread(result_file).shape == (h, w, 3)
    ident = IdentityDictionary.load(identity_file)
    assert ident.n_refs == len(REFS)
    assert "1 face(s) restored, 1 with the identity dictionary" in message
    # the dictionary is reusable: uploading it gives the same identity result
    again = call(app, PHOTO, None, identity_file)
    assert np.array_equal(again[2], specific) and again[5] is None
    # upscale: the slider's before image is resized to the result
    (before, after), *_ = call(app, PHOTO, mode="generic", upscale=2.0)
    assert before.shape == after.shape == (2 * h, 2 * w, 3)


def test_clear_messages_instead_of_stack_traces(app, tmp_path, monkeypatch):
    sky = tmp_path / "sky.png"
    cv2.imwrite(str(sky), np.full((300, 400, 3), 180, np.uint8))
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    for args, options, expected in (
        ((None,), {}, "Upload a photo first."),
        ((sky,), {}, "sky.png: no face found in this photo"),
        ((PHOTO,), {"min_face": 128}, "obama_lowres.jpg: face is 107 px wide, below the minimum of 128"),
        ((notes,), {}, "notes.png: not an image file"),
        ((PHOTO, None, None, "identity"), {}, "needs reference photos or an identity dictionary"),
    ):
        with pytest.raises(gr.Error, match=expected) as err:
            call(app, *args, **options)
        assert str(tmp_path) not in str(err.value)
    inputs = load_parity_inputs()
    foreign = small_net(seed=3).encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1])
    path = foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(gr.Error, match="rebuild it from its references"):
        call(app, PHOTO, None, str(path))
    app = gradio_app.Demo(None, "cpu")
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMDNET_WEIGHTS", raising=False)
    monkeypatch.setattr("dmdnet_plugin.weights.BUNDLED", tmp_path / "not_installed.safetensors")
    with pytest.raises(gr.Error, match="no DMDNet weights found"):
        call(app, PHOTO)


def test_messages_name_files_without_server_paths_or_control_characters(app, tmp_path):
    """Every refusal a browser or an agent gets names files by their names, escaped, and never shows a
    folder of the server: uploads, the identities folder, the app's own temporary folder."""
    notes = tmp_path / "notes\n.png"
    notes.write_text("not an image")
    wide = tmp_path / "wide.png"
    cv2.imwrite(str(wide), np.zeros((2800, 2800, 3), np.uint8))
    app = dataclasses.replace(app, identities_dir=tmp_path / "ids")
    (tmp_path / "ids").write_text("a file where the identities folder should be")
    for refusal, expected in (
        (lambda: call(app, notes), re.escape("notes\\n.png: not an image file")),
        (lambda: app.restore_photo(str(notes)), re.escape("notes\\n.png: not an image file")),
        (
            lambda: call(app, wide, upscale=4.0),
            f"wide.png upscaled 4x: image is 11200x11200 pixels, more than the limit of {MAX_PIXELS}",
        ),
        (lambda: app.restore_photo(str(PHOTO), identity="nobody"), "no saved identity 'nobody'"),
        (lambda: app.build_identity("someone", REFS[0]), r"\[Errno 17\] File exists: 'ids'$"),
    ):
        with pytest.raises(gr.Error) as err:
            refusal()
        message = err.value.message  # str(err.value) is its repr
        assert re.search(expected, message) and "\n" not in message, message
        assert str(tmp_path) not in message and app.scratch not in message, message


def test_a_broken_weights_file_gives_one_clear_line_everywhere(weights, tmp_path):
    """Empty, truncated or HTML instead of weights: the page and the agents' tools say so in one line
    that names the file, not where it is."""
    empty, truncated, html = tmp_path / "empty.safetensors", tmp_path / "truncated.safetensors", tmp_path / "page.pth"
    empty.write_bytes(b"")
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    html.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>\n")
    for broken in (empty, truncated, html):
        app = gradio_app.Demo(str(broken), "cpu", identities_dir=tmp_path / "ids")
        for refusal in (
            partial(call, app, PHOTO),
            partial(app.restore_clip, str(ROOT / "examples" / "video" / "obama_jitter.mp4"), None, None, True),
            partial(app.restore_photo, str(PHOTO)),
            partial(app.build_identity, "someone", REFS[0]),
        ):
            with pytest.raises(gr.Error) as err:
                refusal()
            message = err.value.message
            assert message.startswith(f"{broken.name}: ") and "\n" not in message and str(tmp_path) not in message


def test_results_are_temporary(weights):
    """A result stays in the app's folder for ``keep_results_s`` (long enough for gradio to copy it), then
    the next request removes it (the folder itself goes at exit: tests/test_mcp.py stops a server)."""
    app = gradio_app.Demo(str(weights), "cpu", keep_results_s=0)
    first = Path(app.restore_photo(str(PHOTO)))
    assert first.is_file() and first.is_relative_to(app.scratch)
    second = Path(app.restore_photo(str(PHOTO)))
    assert second.is_file() and not first.exists() and not first.parent.exists()


def test_the_page_says_when_it_runs_the_bundled_demo_model(monkeypatch, tmp_path):
    app = gradio_app.Demo(None, "cpu")
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DMDNET_WEIGHTS", raising=False)
    message = call(app, PHOTO, mode="generic")[-1]
    assert "dmdnet_demo.safetensors (bundled demo)" in message and "dmdnet weights download" in message


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    with serve(weights, tmp_path_factory.mktemp("gradio") / "server.log") as running:
        yield running  # (url, pid)


def test_concurrent_clients_get_their_own_results_and_the_server_survives(tmp_path):
    """benchmarks/load_gradio.py, small: 3 clients x 3 requests (generic, references, a broken
    file), then 20 at once against a queue of 16, with the bundled demo model."""
    with serve(None, tmp_path / "server.log") as (url, pid):
        report = run_load(url, pid, clients=3, requests=3, burst=20, deadline=300)
        urllib.request.urlopen(url, timeout=10)  # still serving
    statuses = [o.status for o in report.outcomes]
    print(summary(report))
    assert len(statuses) == 29 and statuses.count("refused") == 3 and statuses.count("ok") >= 16
    assert set(statuses) <= {"ok", "refused", "rejected"}, [o for o in report.outcomes if o.status not in ("ok",)]
    assert {o.message for o in report.outcomes if o.status == "refused"} == {
        "broken.png: not a readable image (UnidentifiedImageError)"
    }
    assert {o.message for o in report.outcomes if o.status == "rejected"} <= {"Queue is full! Please try again."}
    assert 0 < report.peak_mb < 4096


def test_launched_app_through_gradio_client(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, pid = server
    client = Client(url, verbose=False)

    def restore(photo: Path, refs: list[str]):
        args = ("auto", 1, 1.0, False, 0.52, 0.05, True, MIN_FACE)
        return client.predict(handle_file(str(photo)), [handle_file(r) for r in refs], None, *args, api_name="/restore")

    slider, generic, specific, crops, result_file, identity_file, message = restore(PHOTO, REFS[:2])
    assert cv2.imread(result_file).shape == cv2.imread(str(PHOTO)).shape
    assert IdentityDictionary.load(identity_file).n_refs == 2
    assert "with the identity dictionary" in message
    # over the pixel limit, less than twice it (where Pillow only warns); gray, so that gr.Image would
    # decode it to convert it to RGB: refused before it is decoded
    huge = tmp_path / "huge.png"
    cv2.imwrite(str(huge), np.zeros((11000, 11000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    before = peak_rss_mb(pid)
    with pytest.raises(AppError, match=f"^huge.png: image is larger than the limit of {MAX_PIXELS} pixels$"):
        restore(huge, [])
    assert peak_rss_mb(pid) - before < 200, (before, peak_rss_mb(pid))  # gr.Image would decode it: +550 MB


def short_clip(path: Path, frames: int) -> Path:
    from video_stability import make_clip, write_clip

    write_clip(make_clip(cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB), frames, damage=lambda f: f)[0], path)
    return path


def test_video_through_gradio_client_and_its_length_limit(server, app, tmp_path):
    import av
    from gradio_client import Client, handle_file

    clip = short_clip(tmp_path / "clip.mp4", 4)
    client = Client(server[0], verbose=False)
    video, message = client.predict(
        handle_file(str(clip)), [handle_file(r) for r in REFS[:2]], None, True, api_name="/restore_video"
    )
    with av.open(video["video"] if isinstance(video, dict) else video) as out:
        assert sum(1 for _ in out.decode(video=0)) == 4 and out.streams.audio
    assert "4 frames at 25.0 fps, 4 faces restored" in message and "person 1: frames 0-3, person" in message
    app = dataclasses.replace(app, max_video_frames=3)
    with pytest.raises(gr.Error, match="clip.mp4: 4 frames, more than the limit of 3"):
        app.restore_clip(str(clip), None, None, True, progress=lambda *a, **k: None)
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(gr.Error, match="text.mp4: not a readable video"):
        app.restore_clip(str(tmp_path / "text.mp4"), None, None, True, progress=lambda *a, **k: None)


def test_browser_uploads_and_restores(server, tmp_path):
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server[0])
        page.locator("input[type=file]").first.set_input_files(str(PHOTO))
        page.wait_for_timeout(1000)
        page.get_by_role("button", name="Restore", exact=True).click()
        page.get_by_text("face(s) restored").wait_for(timeout=120000)
        shot = tmp_path / "gradio.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    if os.environ.get("DMDNET_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["DMDNET_SCREENSHOTS"]) / "gradio_restore.png")
    assert shot.stat().st_size > 10000


@pytest.fixture(scope="module")
def background_folder(tmp_path_factory) -> Path:
    """A folder of one background model (a small x2 Real-ESRGAN network) and a file that is not a model."""
    from test_background import SMALL, rrdbnet, save_pth

    folder = tmp_path_factory.mktemp("upscale_models")
    save_pth(rrdbnet(2, **SMALL), folder / "x2.pth")
    (folder / "notes.txt").write_text("not offered: not a model file")
    return folder


def test_the_background_choice_upscales_the_rest_of_the_photo_with_the_model(weights, background_folder, tmp_path):
    """``--bg-upsampler FOLDER``: its models are the Background choices; one chosen sets the Upscale slider to
    its scale and gives the photo the model's pixels away from the face (Lanczos: a plain resize)."""
    from test_background import face_reach

    from dmdnet_plugin.background import load_upsampler
    from dmdnet_plugin.io import read_image

    app = gradio_app.Demo(
        str(weights), "cpu", precision="fp32", upsamplers=gradio_app.background_models([background_folder])
    )
    assert app.backgrounds() == ["Lanczos", "x2.pth"]
    assert app.upscale_for("x2.pth") == 2.0 and app.upscale_for("Lanczos") == gr.skip()
    photo = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    h, w = photo.shape[:2]
    results = {b: call(app, PHOTO, mode="generic", upscale=2.0, background=b) for b in app.backgrounds()}
    (_, after), *_, result_file, _, message = results["x2.pth"]
    assert after.shape == (2 * h, 2 * w, 3) and "background: x2.pth (2x)" in message and "resized" not in message
    lanczos = results["Lanczos"][0][1]
    model = load_upsampler(background_folder / "x2.pth")(photo, (2 * w, 2 * h))
    away = face_reach(photo, 2) == 0
    assert np.array_equal(after[away], model[away]) and np.abs(after[away].astype(int) - lanczos[away]).mean() > 5
    assert read_image(result_file).pixels.shape == after.shape  # the download: a JPEG, as the upload
    assert "then resized to 3x" in call(app, PHOTO, mode="generic", upscale=3.0, background="x2.pth")[-1]
    with pytest.raises(gr.Error) as err:
        call(app, PHOTO, background="x9.pth")
    assert err.value.message == "no background 'x9.pth': one of Lanczos, x2.pth"


def test_bad_background_models_stop_the_server_at_its_start_in_one_line(background_folder, tmp_path):
    import subprocess

    empty, broken = tmp_path / "empty", tmp_path / "broken.pth"
    empty.mkdir()
    broken.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>\n")
    (tmp_path / "again").mkdir()
    shutil.copy(background_folder / "x2.pth", tmp_path / "again" / "x2.pth")
    for given, expected in (
        ([broken], f"{broken}: not a readable model file (not a PyTorch checkpoint of plain tensors: UnpicklingError)"),
        ([empty], f"{empty}: no .pth or .safetensors files in this folder"),
        ([background_folder, tmp_path / "again"], "two background models named x2.pth: rename one"),
    ):
        with pytest.raises(gradio_app.UpsamplerError, match=f"^{re.escape(expected)}$"):
            gradio_app.background_models(given)
    done = subprocess.run(
        [sys.executable, str(ROOT / "gradio_app.py"), "--bg-upsampler", str(broken)], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    unreadable = "not a readable model file (not a PyTorch checkpoint of plain tensors: UnpicklingError)"
    assert done.stderr == f"error: {broken}: {unreadable}\n"


def test_launched_app_offers_its_background_models_to_gradio_client(weights, background_folder, tmp_path):
    from gradio_client import Client, handle_file

    extra = ("--bg-upsampler", str(background_folder), "--precision", "fp32")
    with serve(weights, tmp_path / "server.log", extra=extra) as (url, _):
        client = Client(url, verbose=False)
        args = ("generic", 2, 1.0, False, 0.52, 0.05, True, MIN_FACE, "x2.pth")
        *_, result_file, _, message = client.predict(handle_file(str(PHOTO)), [], None, *args, api_name="/restore")
    h, w = cv2.imread(str(PHOTO)).shape[:2]
    assert cv2.imread(result_file).shape == (2 * h, 2 * w, 3) and "background: x2.pth (2x)" in message
