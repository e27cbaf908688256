"""The node pack in a real ComfyUI server on 127.0.0.1 (skipped unless COMFYUI_PATH is set).

    COMFYUI_PATH=~/ComfyUI [COMFYUI_PYTHON=~/ComfyUI/venv/bin/python] pytest tests/test_comfy_integration.py

The pack is linked into a temporary --base-directory (custom_nodes, models, input, output), its
templates (example_workflows/) are listed, served and queued through /prompt, bad graphs get node
errors, and the front end's template browser loads each template in headless Chromium (needs
Debian's chromium and the playwright package; skipped without them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import small_net

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[1]
NODES = [
    "DMDNetModelLoader",
    "DMDNetDetectFaces",
    "DMDNetBuildIdentity",
    "DMDNetSaveIdentity",
    "DMDNetLoadIdentity",
    "DMDNetRestoreFaces",
]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, data: dict):
    req = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_comfy_nodes import prepare_inputs

    from dmdnet_plugin.weights import save_checkpoint

    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "dmdnet-plugin").symlink_to(ROOT)
    (base / "models" / "dmdnet").mkdir(parents=True)
    save_checkpoint(small_net(), base / "models" / "dmdnet" / "dmdnet.safetensors")
    (base / "elsewhere").mkdir()  # a folder the user keeps models in, named by extra_model_paths.yaml
    save_checkpoint(small_net(), base / "elsewhere" / "from_extra_paths.safetensors")
    (base / "extra_model_paths.yaml").write_text(f"mine:\n  dmdnet: {base / 'elsewhere'}\n")
    prepare_inputs(base / "input")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [
            os.environ.get("COMFYUI_PYTHON", sys.executable),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--base-directory",
            str(base),
            "--extra-model-paths-config",
            str(base / "extra_model_paths.yaml"),
        ],
        cwd=COMFYUI,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                assert proc.poll() is None, (base / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        (base / "server.pid").write_text(str(proc.pid))
        yield url, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def queue(url: str, prompt: dict, timeout: float = 600) -> dict:
    prompt_id = _post(url + "/prompt", {"prompt": prompt, "client_id": "pytest"})["prompt_id"]
    return wait_for(url, prompt_id, timeout)


def wait_for(url: str, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(prompt_id)


def workflow(name: str) -> dict:
    """A template of example_workflows/ in the API format."""
    from test_comfy_nodes import workflow as api_workflow

    return api_workflow(name)


def test_v3_nodes_appear_in_object_info_with_tooltips(server):
    url, base = server
    info = _get(url + "/object_info")
    for name in NODES:
        node = info[name]
        assert node["category"] == "DMDNet" and node["display_name"].startswith("DMDNet ") and node["description"]
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), name
        assert len(node.get("output_tooltips", [])) == len(node["output"]) and all(node["output_tooltips"]), name
    listed = info["DMDNetModelLoader"]["input"]["required"]["model_name"][1]["options"]
    # the bundled demo, registered in place, and a folder from extra_model_paths.yaml
    assert listed == [
        "dmdnet.safetensors",
        "dmdnet_demo.safetensors",
        "from_extra_paths.safetensors",
        "DMDNet.pth (download)",
    ]
    log = (base / "server.log").read_text()
    assert not [
        line for line in log.splitlines() if "dmdnet" in line.lower() and ("FAILED" in line or "Cannot import" in line)
    ]


def test_templates_are_served_and_run_with_the_bundled_model_and_images(server):
    url, base = server
    listed = _get(url + "/workflow_templates")["dmdnet-plugin"]
    assert sorted(listed) == [
        "dmdnet_build_identity",
        "dmdnet_restore_chosen_people",
        "dmdnet_restore_faces",
        "dmdnet_restore_video",
        "dmdnet_restore_whole_photo",  # listed and served; it runs with an upscale model of the user's
    ]
    for name in listed:
        with urllib.request.urlopen(f"{url}/api/workflow_templates/dmdnet-plugin/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 1000
    result = queue(url, workflow("dmdnet_restore_faces"))
    assert result["status"]["status_str"] == "success", result["status"]
    assert len(result["outputs"]["4"]["images"]) == 1 and len(result["outputs"]["5"]["images"]) == 3
    assert queue(url, workflow("dmdnet_build_identity"))["status"]["status_str"] == "success"
    assert (base / "models" / "dmdnet_identities" / "obama.safetensors").exists()
    result = queue(url, workflow("dmdnet_restore_chosen_people"))
    assert result["status"]["status_str"] == "success", result["status"]
    saved = result["outputs"]["12"]["images"]
    assert len(saved) == 2 and all((base / "output" / s["subfolder"] / s["filename"]).exists() for s in saved)
    result = queue(url, workflow("dmdnet_restore_video"))  # ComfyUI's own video nodes around a temporal restore
    assert result["status"]["status_str"] == "success", result["status"]
    import av

    (saved,) = result["outputs"]["12"]["images"]
    with av.open(str(base / "output" / saved["subfolder"] / saved["filename"])) as video:
        assert sum(1 for _ in video.decode(video=0)) == 24 and video.streams.audio


def test_registry_metadata_passes_comfyuis_own_parser():
    """pyproject.toml read by ComfyUI's comfy_config parser, as the registry tooling reads it."""
    code = (
        "import json, sys; from comfy_config.config_parser import extract_node_configuration as x; "
        "c = x(sys.argv[1]); print(json.dumps({'license': c.project.license.file, 'version': c.project.version, "
        "'repository': c.project.urls.repository, 'icon': c.tool_comfy.icon, "
        "'comfyui': c.project.supported_comfyui_version, 'publisher': c.tool_comfy.publisher_id}))"
    )
    proc = subprocess.run(
        [os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", code, str(ROOT)],
        cwd=COMFYUI,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["license"] == "LICENSE" and (ROOT / "LICENSE").is_file()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]) and meta["repository"].startswith("https://github.com/")
    assert meta["icon"].startswith("https://") and meta["icon"].endswith("docs/icon.png")
    assert meta["comfyui"].startswith(">=") and meta["publisher"]


def test_front_end_lists_the_templates_and_renders_the_v3_nodes(server):
    """The template browser lists the pack's templates; clicking one loads it with every node known
    and its widgets. With DMDNET_THUMBNAILS=DIR each loaded template is saved there as NAME.jpg."""
    url, base = server
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    import cv2

    errors: list[str] = []
    names = ["dmdnet_restore_faces", "dmdnet_build_identity", "dmdnet_restore_chosen_people", "dmdnet_restore_video"]
    names.append("dmdnet_restore_whole_photo")
    loaded = {}
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
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph", timeout=60000)
        page.wait_for_timeout(1500)
        page.keyboard.press("Escape")  # the first-run template dialog
        page.wait_for_timeout(1000)
        for name in names:
            page.evaluate("async () => await window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.wait_for_timeout(2000)  # the dialog fetches the custom nodes' template lists
            page.get_by_text("dmdnet-plugin", exact=True).first.click()
            page.get_by_text(name, exact=True).first.click()
            page.wait_for_function("n => window.app.graph._nodes.length === n", arg=len(workflow(name)), timeout=30000)
            page.wait_for_timeout(1500)  # image previews
            loaded[name] = page.evaluate("""() => window.app.graph._nodes.map(n => [n.type,
                (n.widgets || []).map(w => w.name), !!LiteGraph.registered_node_types[n.type]])""")
            page.screenshot(path=str(base / f"{name}.png"))
        browser.close()
    for name in names:
        assert all(known for _, _, known in loaded[name]), name
        assert sorted(t for t, _, _ in loaded[name]) == sorted(n["class_type"] for n in workflow(name).values())
    widgets = {t: w for t, w, _ in loaded["dmdnet_restore_chosen_people"]}
    assert widgets["DMDNetRestoreFaces"] == [
        "strength",
        "threshold",
        "batch_size",
        "margin",
        "mode",
        "temporal",
        "frame_rate",
        "keep_colours",
    ]
    assert widgets["DMDNetBuildIdentity"] == ["name"]
    if os.environ.get("DMDNET_THUMBNAILS"):
        for name in names:
            shot = cv2.imread(str(base / f"{name}.png"))[70:, 60:]  # the canvas, without the menus
            cv2.imwrite(
                str(Path(os.environ["DMDNET_THUMBNAILS"]) / f"{name}.jpg"),
                cv2.resize(shot, (768, 768 * shot.shape[0] // shot.shape[1]), interpolation=cv2.INTER_AREA),
                [cv2.IMWRITE_JPEG_QUALITY, 85],
            )
    relevant = [e for e in errors if "DMDNet" in e or "node" in e.lower() or "Uncaught" in e]
    assert not relevant, relevant


def node_error(url: str, prompt: dict) -> str:
    """What the user is told about a graph that cannot run: ComfyUI's validation error from
    /prompt, or the failing node's message from the history."""
    try:
        prompt_id = _post(url + "/prompt", {"prompt": prompt, "client_id": "pytest"})["prompt_id"]
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        errors = [e for node in body.get("node_errors", {}).values() for e in node["errors"]]
        return "; ".join(f"{e['message']}: {e['details']}" for e in errors) or body["error"]["message"]
    result = wait_for(url, prompt_id)
    assert result["status"]["status_str"] == "error", result["status"]
    event = next(data for kind, data in result["status"]["messages"] if kind == "execution_error")
    assert "Traceback" not in event["exception_message"]
    return f"{event['node_type']}: {event['exception_message'].strip()}"


def _restore_graph(image_node: dict, model_name: str = "dmdnet.safetensors", identity: str | None = None) -> dict:
    graph = {
        "1": image_node,
        "2": {
            "class_type": "DMDNetModelLoader",
            "inputs": {"model_name": model_name, "device": "auto", "precision": "auto"},
        },
        "3": {
            "class_type": "DMDNetRestoreFaces",
            "inputs": {
                "model": ["2", 0],
                "image": ["1", 0],
                "strength": 1.0,
                "threshold": 0.5,
                "batch_size": 8,
                "mode": "auto",
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    if identity:
        graph["5"] = {"class_type": "DMDNetLoadIdentity", "inputs": {"identity_name": identity}}
        graph["3"]["inputs"]["identities"] = ["5", 0]
    return graph


def _peak_mb(base: Path) -> float:
    status = Path(f"/proc/{(base / 'server.pid').read_text()}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def test_bad_graphs_get_clear_node_errors_and_the_server_keeps_working(server):
    import torch
    from parity_inputs import load_parity_inputs
    from safetensors.torch import save_file

    url, base = server
    save_file({"weight": torch.zeros(4, 4)}, str(base / "models" / "dmdnet" / "not_dmdnet.safetensors"))
    inputs = load_parity_inputs()
    foreign = small_net(seed=1).encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1], name="foreign")
    foreign.save(base / "models" / "dmdnet_identities" / "foreign.safetensors")
    photo = {"class_type": "LoadImage", "inputs": {"image": "p1_1.jpg"}}
    tiny = {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}
    cases = {
        "missing checkpoint": (
            _restore_graph(photo, "missing.safetensors"),
            r"DMDNetModelLoader: DMDNet checkpoint missing.safetensors not found in models/dmdnet",
        ),
        "not a DMDNet checkpoint": (
            _restore_graph(photo, "not_dmdnet.safetensors"),
            r"DMDNetModelLoader: .*not_dmdnet.safetensors: not a DMDNet state dict",
        ),
        "identity of another model": (
            _restore_graph(photo, identity="foreign.safetensors"),
            r"DMDNetRestoreFaces: identity dictionary foreign was built by model \w+, not by "
            r"the loaded model \w+",
        ),
        "1x1 image": (
            _restore_graph(tiny),
            r"DMDNetRestoreFaces: DMDNet Restore Faces: the images are 1x1 px, too small",
        ),
    }
    seen = {}
    for label, (graph, pattern) in cases.items():
        seen[label] = node_error(url, graph)
        assert re.search(pattern, seen[label]), (label, seen[label])
    frames = _restore_graph({"class_type": "RepeatImageBatch", "inputs": {"image": ["6", 0], "amount": 1}})
    frames["6"] = photo
    assert queue(url, frames)["status"]["status_str"] == "success"  # warm: detector and model loaded, run once
    before = _peak_mb(base)
    frames["1"]["inputs"]["amount"] = 64
    result = queue(url, frames)
    assert result["status"]["status_str"] == "success", result["status"]
    assert len(result["outputs"]["4"]["images"]) == 64
    grown = _peak_mb(base) - before
    # bounded by the data: 64 frames and 64 restored crops of 512x512 in float32 are 400 MiB, each
    # node's input and output stay cached by ComfyUI, and detections keep each face's crop; about
    # 28 MiB per frame was measured, and nothing grows with the run
    assert grown < 64 * 40, f"peak memory grew by {grown:.0f} MiB for 64 frames of 512x512"
    result = queue(url, workflow("dmdnet_restore_faces"))  # still serving good graphs
    assert result["status"]["status_str"] == "success", result["status"]
    print(json.dumps({**seen, "64 frames": f"success, peak memory +{grown:.0f} MiB"}, indent=1))
