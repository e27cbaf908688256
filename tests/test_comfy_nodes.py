"""ComfyUI nodes against a minimal stand-in for comfy's modules (tests/comfy_stub).

The real server is exercised by tests/test_comfy_integration.py when COMFYUI_PATH is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import inspect
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import DATA, small_net

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """Import the node pack the way ComfyUI does (the repository root is the custom node)."""
    models = tmp_path_factory.mktemp("models")
    os.environ["COMFY_STUB_MODELS"] = str(models)
    os.environ["COMFY_STUB_INPUT"] = str(tmp_path_factory.mktemp("input"))
    sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dmdnet_custom_node", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["dmdnet_custom_node"] = pack
    spec.loader.exec_module(pack)
    from dmdnet_plugin.weights import save_checkpoint

    (models / "dmdnet").mkdir()
    save_checkpoint(small_net(), models / "dmdnet" / "dmdnet.safetensors")
    yield pack, models
    sys.path.remove(str(Path(__file__).parent / "comfy_stub"))


def node_classes(pack) -> dict:
    """node_id -> class, as ComfyUI's V3 loader gets them: comfy_entrypoint() -> on_load() -> get_node_list()."""
    extension = asyncio.run(pack.comfy_entrypoint())
    asyncio.run(extension.on_load())
    return {cls.define_schema().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def call(nodes: dict, name: str, *args, **kwargs) -> tuple:
    return nodes[name].execute(*args, **kwargs).args


def test_node_contracts(comfy):
    pack, _ = comfy
    nodes = node_classes(pack)
    assert len(nodes) == 6 and not hasattr(pack, "NODE_CLASS_MAPPINGS")  # V3 only
    for name, cls in nodes.items():
        schema = cls.define_schema()
        params = list(inspect.signature(cls.execute).parameters)
        assert params == [i.id for i in schema.inputs], name
        assert schema.category == "DMDNet" and schema.description and schema.display_name.startswith("DMDNet ")
        for socket in schema.inputs + schema.outputs:
            assert socket.tooltip, (name, socket.id or socket.display_name)
        optional = [p for p in inspect.signature(cls.execute).parameters.values() if p.default is not p.empty]
        assert [p.name for p in optional] == [i.id for i in schema.inputs if i.optional], name
    assert nodes["DMDNetSaveIdentity"].define_schema().is_output_node
    listed = nodes["DMDNetModelLoader"].define_schema().inputs[0].options["options"]
    # the bundled demo, where it ships, and the authors' file as a download
    assert listed == ["dmdnet.safetensors", "dmdnet_demo.safetensors", "DMDNet.pth (download)"]


def test_templates_match_the_nodes_and_the_files(comfy, tmp_path):
    pack, _ = comfy
    bw = build_workflows()
    for name, cls in node_classes(pack).items():
        widgets, links, outputs = bw.NODE_SPECS[name]
        schema = cls.define_schema()
        assert [i.id for i in schema.inputs if i.is_widget] == widgets, name
        # a widget that a template wires (frame_rate) is listed among the links as well
        assert [(i.id, i.io_type) for i in schema.inputs if not i.is_widget] == [
            l for l in links if l[0] not in widgets
        ]
        assert [(o.display_name, o.io_type) for o in schema.outputs] == outputs, name
    bw.main(tmp_path)
    templates = ROOT / "example_workflows"
    for path in tmp_path.iterdir():
        assert json.loads(path.read_text()) == json.loads((templates / path.name).read_text())
        assert (templates / f"{path.stem}.jpg").is_file(), f"{path.stem} has no thumbnail"
    assert sorted(p.stem for p in tmp_path.iterdir()) == sorted(bw.WORKFLOWS) and len(bw.WORKFLOWS) == 5
    for graph in bw.WORKFLOWS.values():
        used = {w[0] for cls, w, _ in graph.values() if cls in ("LoadImage", "LoadVideo")}
        assert used <= set(node_module().EXAMPLE_INPUTS)  # runs with the bundled examples only
        assert all(w[0] == "dmdnet_demo.safetensors" for cls, w, _ in graph.values() if cls == "DMDNetModelLoader")


# ----------------------------------------------------------- a small executor for API prompts
def _load_image(folder: Path, image: str):
    rgb = cv2.cvtColor(cv2.imread(str(folder / image)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    return torch.from_numpy(rgb)[None], torch.zeros(1, *rgb.shape[:2])


def _image_batch(image1, image2):
    if image2.shape[1:3] != image1.shape[1:3]:
        image2 = torch.nn.functional.interpolate(image2.movedim(-1, 1), image1.shape[1:3], mode="bilinear").movedim(
            1, -1
        )
    return (torch.cat([image1, image2]),)


def run_prompt(pack, prompt: dict, inputs: Path, outputs: Path) -> dict:
    results: dict[str, tuple] = {}

    def value(v):
        return results[v[0]][v[1]] if isinstance(v, list) else v

    pending = dict(prompt)
    while pending:
        for node_id, node in list(pending.items()):
            if any(isinstance(v, list) and v[0] not in results for v in node["inputs"].values()):
                continue
            args = {k: value(v) for k, v in node["inputs"].items()}
            cls = node["class_type"]
            if cls == "LoadImage":
                results[node_id] = _load_image(inputs, args["image"])
            elif cls == "ImageBatch":
                results[node_id] = _image_batch(**args)
            elif cls == "LoadVideo":  # ComfyUI's video nodes, as far as the template uses them
                results[node_id] = (inputs / args["file"],)
            elif cls == "GetVideoComponents":
                with av.open(str(args["video"])) as container:
                    stream = container.streams.video[0]
                    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
                    results[node_id] = (torch.from_numpy(frames).float() / 255, None, float(stream.average_rate))
            elif cls in ("CreateVideo", "SaveVideo"):
                results[node_id] = (args,)
            elif cls == "SaveImage":
                for i, img in enumerate(args["images"]):
                    out = (img.numpy() * 255).round().astype(np.uint8)
                    cv2.imwrite(
                        str(outputs / f"{args['filename_prefix']}_{i:05d}_.png"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
                    )
                results[node_id] = ()
            else:
                results[node_id] = node_classes(pack)[cls].execute(**args).args
            del pending[node_id]
    return results


def prepare_inputs(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    shutil.copy(ROOT / "examples" / "photos" / "family.jpg", folder / "family.jpg")
    for i in (1, 2, 3):
        shutil.copy(ROOT / "examples" / "refs" / "obama" / f"o{i}.jpg", folder / f"o{i}.jpg")
    left = cv2.imread(str(DATA / "celebref" / "00005" / "3.jpg"))
    right = cv2.imread(str(DATA / "lq" / "00022_14.jpg"))
    cv2.imwrite(str(folder / "group.jpg"), np.hstack([left, right]))
    for i, name in enumerate(("0", "1", "10")):
        shutil.copy(DATA / "celebref" / "00022" / f"{name}.jpg", folder / f"p2_{i + 1}.jpg")
    for i, name in enumerate(("0", "1", "2")):
        shutil.copy(DATA / "celebref" / "00005" / f"{name}.jpg", folder / f"p1_{i + 1}.jpg")


def workflow(name: str) -> dict:
    """A template in the API format, as the front end would send it to /prompt."""
    return build_workflows().api_format(build_workflows().WORKFLOWS[name])


def build_workflows():
    sys.path.insert(0, str(ROOT / "comfy_nodes"))
    import build_workflows as bw

    return bw


def node_module():
    return sys.modules["dmdnet_custom_node.comfy_nodes.nodes_dmdnet"]


def test_example_workflows_run(comfy, tmp_path):
    pack, models = comfy
    import comfy.model_management as mm
    import comfy.utils

    inputs, outputs = Path(os.environ["COMFY_STUB_INPUT"]), tmp_path / "output"
    outputs.mkdir()
    assert sorted(p.name for p in inputs.glob("dmdnet_*")) == sorted(node_module().EXAMPLE_INPUTS)
    results = run_prompt(pack, workflow("dmdnet_restore_faces"), inputs, outputs)
    image, faces = results["3"]
    assert image.shape == (1, 640, 437, 3) and faces.shape == (3, 512, 512, 3)
    assert (outputs / "dmdnet_restored_00000_.png").exists()
    assert comfy.utils.updates[-1] == (3, 3)  # progress counted faces
    assert ("soft_empty_cache",) in mm.calls and any(c[0] == "free_memory" for c in mm.calls)

    run_prompt(pack, workflow("dmdnet_build_identity"), inputs, outputs)
    assert (models / "dmdnet_identities" / "obama.safetensors").exists()

    results = run_prompt(pack, workflow("dmdnet_restore_chosen_people"), inputs, outputs)
    batch, (image, faces) = results["10"][0], results["11"]
    assert image.shape == batch.shape and image.shape[0] == 2 and faces.shape == (1, 512, 512, 3)
    changed = ((image[0] - batch[0]).abs().amax(-1) > 4 / 255).float().mean()
    assert changed > 0.05, changed  # the chosen person's face (17% of the photo) was restored
    assert torch.equal(image[1], batch[1])  # the family photo has no match: left exactly as it was

    results = run_prompt(pack, workflow("dmdnet_restore_video"), inputs, outputs)
    clip, (frames, faces), video = results["9"][0], results["10"], results["11"][0]
    assert frames.shape == clip.shape == (24, 232, 386, 3) and faces.shape == (24, 512, 512, 3)
    assert video["images"] is frames and video["fps"] == 25.0
    changed = ((frames - clip).abs().amax(-1) > 4 / 255).float().mean()
    assert changed > 0.05, changed  # the face in every frame was restored

    group = _load_image(inputs, "dmdnet_family.jpg")[0]
    detected, crops, mask = call(node_classes(pack), "DMDNetDetectFaces", group, "hog", 24, 0, False)
    assert crops.shape == (3, 512, 512, 3) and mask.shape == (1, 640, 437) and mask.max() == 1 and mask[0, 5, 5] == 0
    with pytest.raises(dataclasses.FrozenInstanceError):  # the detector's cached output cannot be changed
        detected.faces[0].crop = None


def test_restore_matches_identities_per_face_and_passes_through_without_faces(comfy, tmp_path):
    pack, _ = comfy
    nodes = node_classes(pack)
    prepare_inputs(tmp_path)
    model = call(nodes, "DMDNetModelLoader", "dmdnet.safetensors", "auto", "auto")[0]
    refs = torch.cat([_load_image(tmp_path, f"p2_{i}.jpg")[0] for i in (1, 2)])
    identities = call(nodes, "DMDNetBuildIdentity", model, refs, "person2")[0]
    group = _load_image(tmp_path, "group.jpg")[0]
    faces = call(nodes, "DMDNetDetectFaces", group, "hog", 24, 0, False)[0]
    out, crops = call(nodes, "DMDNetRestoreFaces", model, group, 1.0, 0.5, 4, faces=faces, identities=identities)
    assert crops.shape[0] == 2
    sky = torch.full((1, 300, 400, 3), 0.6)
    out, crops = call(nodes, "DMDNetRestoreFaces", model, sky, 1.0, 0.5, 4)
    assert torch.equal(out, sky) and crops.shape == (1, 512, 512, 3)
    weak, _ = call(nodes, "DMDNetRestoreFaces", model, group, 0.0, 0.5, 4)
    assert torch.allclose(weak, group, atol=1 / 255)  # strength 0 keeps the photo


def test_interruption_is_checked_between_faces(comfy, tmp_path):
    pack, _ = comfy
    import comfy.model_management as mm

    prepare_inputs(tmp_path)
    nodes = node_classes(pack)
    model = call(nodes, "DMDNetModelLoader", "dmdnet.safetensors", "cpu", "fp32")[0]
    mm.interrupted = True
    with pytest.raises(mm.InterruptProcessingException):
        call(nodes, "DMDNetRestoreFaces", model, _load_image(tmp_path, "family.jpg")[0], 1.0, 0.5, 1)


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/passwd", "..", "", ".hidden", "x" * 200, "a\\b"])
def test_identity_names_cannot_leave_their_folder(comfy, name):
    pack, _ = comfy
    node = node_module()
    with pytest.raises(ValueError, match="invalid identity name"):
        node.identity_path(name)
    assert node.identity_path("Grandma 1950").endswith("dmdnet_identities/Grandma 1950.safetensors")


def test_cli_gradio_and_comfyui_return_the_same_pixels(comfy, tmp_path):
    """One pipeline under every surface: the same photo and identity give the same restored image."""
    sys.path.insert(0, str(ROOT))
    gradio_app = pytest.importorskip("gradio_app")
    from dmdnet_plugin.cli import main
    from dmdnet_plugin.io import read_image

    pack, models = comfy
    nodes = node_classes(pack)
    weights = models / "dmdnet" / "dmdnet.safetensors"
    photo = tmp_path / "obama.png"  # lossless, so that files can be compared to the pixel
    cv2.imwrite(str(photo), cv2.imread(str(ROOT / "examples" / "photos" / "obama_lowres.jpg")))
    identity = models / "dmdnet_identities" / "obama.safetensors"
    assert (
        main(
            [
                "identity",
                "build",
                str(ROOT / "examples" / "refs" / "obama"),
                "-o",
                str(identity),
                "--name",
                "obama",
                "--weights",
                str(weights),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "restore",
                str(photo),
                "-o",
                str(tmp_path / "cli"),
                "--weights",
                str(weights),
                "--identity",
                str(identity),
                "--report",
                str(tmp_path / "r.json"),
                "--precision",
                "fp32",  # the same pixels on every CPU (auto may pick bf16 on one and fp32 on another)
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r.json").read_text())["files"][0]["faces"][0]["identity"] == "obama"
    by_cli = read_image(tmp_path / "cli" / "obama.png").pixels

    out = gradio_app.Demo(str(weights), "cpu", precision="fp32").restore(
        str(photo), None, str(identity), "auto", 1.0, 1.0, False, progress=lambda *a, **k: None
    )
    by_gradio = read_image(out[4]).pixels

    model = call(nodes, "DMDNetModelLoader", "dmdnet.safetensors", "cpu", "fp32")[0]
    identities = call(nodes, "DMDNetLoadIdentity", "obama.safetensors")[0]
    image = _load_image(tmp_path, "obama.png")[0]
    restored = call(nodes, "DMDNetRestoreFaces", model, image, 1.0, 0.5, 4, identities=identities)[0]
    by_comfy = (restored[0].numpy() * 255).round().astype(np.uint8)

    assert np.abs(by_cli.astype(int) - read_image(photo).pixels).mean() > 1  # the face was restored
    np.testing.assert_array_equal(by_gradio, by_cli)
    np.testing.assert_array_equal(by_comfy, by_cli)


def test_empty_and_tiny_batches_get_clear_node_errors(comfy):
    """ComfyUI's own nodes cannot make an empty IMAGE batch, so this case is checked here; the 1x1
    case also runs on the real server (test_comfy_integration)."""
    pack, _ = comfy
    nodes = node_classes(pack)
    model = call(nodes, "DMDNetModelLoader", "dmdnet.safetensors", "cpu", "fp32")[0]
    empty, tiny = torch.zeros(0, 64, 64, 3), torch.zeros(1, 1, 1, 3)
    with pytest.raises(ValueError, match=r"DMDNet Restore Faces: the image batch is empty \(shape \(0, 64, 64, 3\)\)"):
        call(nodes, "DMDNetRestoreFaces", model, empty, 1.0, 0.5, 4)
    with pytest.raises(ValueError, match="DMDNet Detect Faces: the image batch is empty"):
        call(nodes, "DMDNetDetectFaces", empty, "hog", 24, 0, False)
    with pytest.raises(
        ValueError, match="DMDNet Build Identity: the images are 1x1 px, too small to hold a face of 24 px"
    ):
        call(nodes, "DMDNetBuildIdentity", model, tiny, "x")
    huge = torch.zeros(1, 1, 1, 3).expand(2, 11000, 11000, 3)  # 1.4 GB a frame if it were copied; it is not
    with pytest.raises(ValueError, match="image batch: image is 11000x11000 pixels, more than the limit"):
        call(nodes, "DMDNetRestoreFaces", model, huge, 1.0, 0.5, 4)


def _decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_cli_gradio_and_comfyui_restore_a_clip_alike(comfy, tmp_path):
    """One clip call under every surface (clips.restore_clip): the same clip and identity give the same
    tracked, restored frames, up to the video codec. The CLI and Gradio write H.264 (visually
    lossless, not bit-exact); the node returns the frames themselves."""
    sys.path.insert(0, str(ROOT))
    gradio_app = pytest.importorskip("gradio_app")
    from dmdnet_plugin.cli import main
    from dmdnet_plugin.identity import IdentityDictionary

    pack, models = comfy
    nodes = node_classes(pack)
    weights = models / "dmdnet" / "dmdnet.safetensors"
    clip, identity = ROOT / "examples" / "video" / "obama_jitter.mp4", tmp_path / "obama.safetensors"
    refs = str(ROOT / "examples" / "refs" / "obama")
    assert main(["identity", "build", refs, "-o", str(identity), "--name", "obama", "--weights", str(weights)]) == 0
    report = tmp_path / "r.json"
    args = ["restore", str(clip), "-o", str(tmp_path / "cli"), "--weights", str(weights), "--identity", str(identity)]
    assert main([*args, "--report", str(report), "--precision", "fp32"]) == 0
    tracks = json.loads(report.read_text())["files"][0]["video"]["tracks"]
    by_cli = _decoded(tmp_path / "cli" / clip.name)

    video, message = gradio_app.Demo(str(weights), "cpu", precision="fp32").restore_clip(
        str(clip), None, str(identity), True, progress=lambda *a, **k: None
    )
    by_gradio = _decoded(video)

    frames = _decoded(clip)
    model = call(nodes, "DMDNetModelLoader", "dmdnet.safetensors", "cpu", "fp32")[0]
    image = torch.from_numpy(frames.astype(np.float32) / 255)
    restored = call(
        nodes,
        "DMDNetRestoreFaces",
        model,
        image,
        1.0,
        0.52,
        4,
        identities=[IdentityDictionary.load(identity)],
        temporal=True,
        frame_rate=25.0,
    )[0]
    by_comfy = (restored.numpy() * 255).round().astype(np.uint8)

    assert [t["identity"] for t in tracks] == ["obama"] and "person 1: frames 0-23, obama" in message
    faces = np.abs(by_comfy.astype(int) - frames).max(-1) > 8  # where the restoration changed the frames
    restoration = np.abs(by_comfy.astype(int) - frames)[faces].mean()
    for name, other in (("cli", by_cli), ("gradio", by_gradio)):
        codec = np.abs(other.astype(int) - by_comfy)
        print(f"{name}: codec {codec.mean():.2f} (faces {codec[faces].mean():.2f}), restoration {restoration:.2f}")
        assert other.shape == by_comfy.shape and faces.mean() > 0.01
        assert codec.mean() < 2.5 and codec[faces].mean() < restoration / 5  # measured: 1.5, 2.4 against 17.5


@contextlib.contextmanager
def file_server(files: dict[str, bytes]):
    """A real HTTP server on 127.0.0.1 serving ``files`` by path; yields (url, the paths requested)."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.send_header("Content-Type", "text/html" if self.path.endswith(".html") else "application/octet-stream")
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()


def test_the_loader_downloads_the_authors_file_once_and_refuses_bad_ones(comfy, tmp_path, monkeypatch):
    """The authors' layout (a plain state dict in a .pth) from a local server; a truncated file and an
    HTML page are refused with a node error that says where to put the file, and never land."""
    pack, models = comfy
    import comfy.utils

    nodes = node_classes(pack)
    official = tmp_path / "official.pth"
    torch.save(small_net().state_dict(), official)  # the authors' DMDNet.pth is a plain state dict
    good = official.read_bytes()
    files = {"/DMDNet.pth": good, "/cut.pth": good[: len(good) // 2], "/error.html": b"<html>rate limited</html>"}
    target = models / "dmdnet" / "DMDNet.pth"
    with file_server(files) as (url, requested):
        schema = nodes["DMDNetModelLoader"].define_schema()
        assert (
            "DMDNet.pth (download)" in schema.inputs[0].options["options"] and not requested
        )  # listing fetches nothing
        for path, problem in (("/cut.pth", "not a readable checkpoint"), ("/error.html", "not a readable checkpoint")):
            monkeypatch.setenv("DMDNET_WEIGHTS_URL", url + path)
            with pytest.raises(RuntimeError) as err:
                call(nodes, "DMDNetModelLoader", "DMDNet.pth (download)", "cpu", "fp32")
            message = str(err.value)
            assert message.startswith("DMDNet Model Loader: downloading DMDNet.pth failed: download from ")
            assert (
                problem in message and f"put it in {models / 'dmdnet'}" in message and "DMDNET_WEIGHTS_URL" in message
            )
            assert not target.exists() and not list((models / "dmdnet").glob("*.tmp*"))  # nothing partial landed
        monkeypatch.setenv("DMDNET_WEIGHTS_URL", url + "/DMDNet.pth")
        comfy.utils.updates.clear()
        model = call(nodes, "DMDNetModelLoader", "DMDNet.pth (download)", "cpu", "fp32")[0]
        assert target.read_bytes() == good and model.name == "DMDNet.pth"
        assert comfy.utils.updates[-1] == (len(good), len(good))  # ComfyUI's progress bar, in bytes
        assert model.model.net.fingerprint() == small_net().fingerprint()
        again = call(nodes, "DMDNetModelLoader", "DMDNet.pth (download)", "cpu", "fp32")[0]  # the file is there now
        assert requested == ["/cut.pth", "/error.html", "/DMDNet.pth"] and again.name == "DMDNet.pth"
        listed = nodes["DMDNetModelLoader"].define_schema().inputs[0].options["options"]
        assert "DMDNet.pth" in listed and "DMDNet.pth (download)" in listed  # a saved graph still validates
    target.unlink()


def test_a_bad_local_checkpoint_is_a_node_error_of_one_line(comfy):
    """An empty file in models/dmdnet (a failed copy) is refused with the file and the problem, no traceback."""
    pack, models = comfy
    from dmdnet_plugin.weights import WeightsError

    broken = models / "dmdnet" / "broken.pth"
    broken.write_bytes(b"")
    try:
        with pytest.raises(WeightsError) as err:
            call(node_classes(pack), "DMDNetModelLoader", "broken.pth", "cpu", "fp32")
        assert str(err.value) == f"{broken}: not a readable checkpoint (empty file)"
    finally:
        broken.unlink()


def test_the_download_entry_stops_within_a_second_when_processing_is_interrupted(comfy, monkeypatch, caplog):
    """ComfyUI's cancel reaches a download whose server has gone silent after the headers."""
    import logging
    import time

    import comfy.model_management as mm

    pack, models = comfy
    release = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(110 << 20))
            self.end_headers()
            release.wait(60)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DMDNET_WEIGHTS_URL", f"http://127.0.0.1:{server.server_address[1]}/DMDNet.pth")
    nodes = node_classes(pack)
    interrupted_at = []
    cancel = threading.Timer(0.5, lambda: interrupted_at.append(time.monotonic()) or setattr(mm, "interrupted", True))
    cancel.start()
    try:
        with pytest.raises(mm.InterruptProcessingException), caplog.at_level(logging.INFO):
            call(nodes, "DMDNetModelLoader", "DMDNet.pth (download)", "cpu", "fp32")
        assert interrupted_at and time.monotonic() - interrupted_at[0] < 1.0
        assert "download of DMDNet.pth cancelled; nothing was kept" in caplog.text
    finally:
        cancel.cancel()
        mm.interrupted = False
        release.set()
        server.shutdown()
        server.server_close()
    assert not list((models / "dmdnet").glob("*DMDNet.pth*"))  # neither the file nor a partial one


class _NodeOutput(tuple):
    @property
    def args(self) -> tuple:
        return tuple(self)


class UpscaleModelLoader:
    """ComfyUI's own node (comfy_extras/nodes_upscale_model.py), as far as the template uses it: the file in
    models/upscale_models read without unpickling, and handed to spandrel."""

    @classmethod
    def execute(cls, model_name: str) -> _NodeOutput:
        from spandrel import ImageModelDescriptor, ModelLoader

        state = torch.load(Path(os.environ["COMFY_STUB_MODELS"]) / "upscale_models" / model_name, weights_only=True)
        model = ModelLoader().load_from_state_dict(state["params_ema"] if "params_ema" in state else state)
        assert isinstance(model, ImageModelDescriptor)
        return _NodeOutput([model.eval()])


class ImageUpscaleWithModel:
    """ComfyUI's own node, untiled: the batch through the model, clamped to [0, 1]."""

    @classmethod
    def execute(cls, upscale_model, image: torch.Tensor) -> _NodeOutput:
        with torch.inference_mode():
            return _NodeOutput([upscale_model(image.movedim(-1, 1)).movedim(1, -1).clamp(0, 1)])


def test_the_whole_photo_template_upscales_with_comfyuis_nodes_then_restores(comfy, tmp_path, monkeypatch):
    """dmdnet_restore_whole_photo: ComfyUI's upscale-model nodes (stand-ins that load the file with spandrel, as
    ComfyUI does) make the photo twice the size, and the faces are restored on that and pasted at that size:
    every pixel the faces do not reach is the upscale model's."""
    pytest.importorskip("spandrel")
    from test_background import SMALL, rrdbnet, save_pth

    pack, models = comfy
    (models / "upscale_models").mkdir(exist_ok=True)
    save_pth(rrdbnet(2, **SMALL), models / "upscale_models" / build_workflows().UPSCALER)
    comfy_nodes = {"UpscaleModelLoader": UpscaleModelLoader, "ImageUpscaleWithModel": ImageUpscaleWithModel}
    pack_nodes = node_classes
    monkeypatch.setitem(globals(), "node_classes", lambda pack: {**pack_nodes(pack), **comfy_nodes})
    outputs = tmp_path / "output"
    outputs.mkdir()
    results = run_prompt(pack, workflow("dmdnet_restore_whole_photo"), Path(os.environ["COMFY_STUB_INPUT"]), outputs)
    photo, upscaled, (image, faces) = results["1"][0], results["3"][0], results["5"]
    assert upscaled.shape == image.shape == (1, 1280, 874, 3) and photo.shape == (1, 640, 437, 3)
    assert (outputs / "dmdnet_restored_whole_00000_.png").exists()
    found, _, masks = call(node_classes(pack), "DMDNetDetectFaces", upscaled, "auto", 24, 0, False)
    assert len(found.faces) == faces.shape[0] >= 1  # faces found on the upscaled photo, as the restore finds them
    reach = masks[0]
    assert torch.equal(image[0][reach == 0], upscaled[0][reach == 0]) and (reach == 0).float().mean() > 0.5
    lanczos = cv2.resize(photo[0].numpy(), (874, 1280), interpolation=cv2.INTER_LANCZOS4)
    assert np.abs(upscaled[0].numpy() - lanczos)[reach.numpy() == 0].mean() > 5 / 255  # the model's, not a resize
    changed = (image[0] - upscaled[0]).abs().amax(-1)[reach == 1]
    assert changed.mean() > 4 / 255  # the faces were restored, at the upscaled size
