"""The node pack in a real ComfyUI server on 127.0.0.1 (skipped unless COMFYUI_PATH is set).

    COMFYUI_PATH=~/ComfyUI [COMFYUI_PYTHON=~/ComfyUI/venv/bin/python] pytest tests/test_comfy_integration.py

The pack is linked into a temporary --base-directory (custom_nodes, models, input, output), the
example workflows are queued through /prompt, and the front end loads the UI-format workflow in
headless Chromium (needs Debian's chromium and the playwright package; skipped without them).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import small_net

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")
ROOT = Path(__file__).resolve().parents[1]
NODES = ["DMDNetModelLoader", "DMDNetDetectFaces", "DMDNetBuildIdentity", "DMDNetSaveIdentity",
         "DMDNetLoadIdentity", "DMDNetRestoreFaces"]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, data: dict):
    req = urllib.request.Request(url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dmdnet_plugin.weights import save_checkpoint
    from test_comfy_nodes import prepare_inputs

    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "dmdnet-plugin").symlink_to(ROOT)
    (base / "models" / "dmdnet").mkdir(parents=True)
    save_checkpoint(small_net(), base / "models" / "dmdnet" / "dmdnet.safetensors")
    prepare_inputs(base / "input")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
         "--port", str(port), "--disable-auto-launch", "--base-directory", str(base)],
        cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(url + "/system_stats")
                break
            except OSError:
                assert proc.poll() is None, (base / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def queue(url: str, prompt: dict, timeout: float = 600) -> dict:
    prompt_id = _post(url + "/prompt", {"prompt": prompt, "client_id": "pytest"})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(prompt_id)


def workflow(name: str) -> dict:
    return json.loads((ROOT / "comfy_nodes" / "workflows" / name).read_text())


def test_nodes_appear_in_object_info(server):
    url, base = server
    info = _get(url + "/object_info")
    for name in NODES:
        assert info[name]["category"] == "DMDNet" and info[name]["display_name"].startswith("DMDNet ")
    listed = info["DMDNetModelLoader"]["input"]["required"]["model_name"][0]
    assert listed == ["dmdnet.safetensors", "dmdnet_demo.safetensors"]  # the bundled demo, registered in place
    log = (base / "server.log").read_text()
    assert not [line for line in log.splitlines() if "dmdnet" in line.lower() and ("FAILED" in line or "Cannot import" in line)]


def test_example_workflows_run_and_write_images(server):
    url, base = server
    result = queue(url, workflow("generic_restore_api.json"))
    assert result["status"]["status_str"] == "success", result["status"]
    assert len(result["outputs"]["4"]["images"]) == 1 and len(result["outputs"]["5"]["images"]) == 3
    build = workflow("build_identity_api.json")
    assert queue(url, build)["status"]["status_str"] == "success"
    for person, prefix in (("obama", "p1_"), ("person2", "p2_")):
        for i in (1, 2, 3):
            build[str(i)]["inputs"]["image"] = f"{prefix}{i}.jpg"
        build["7"]["inputs"]["name"] = build["8"]["inputs"]["name"] = person
        assert queue(url, build)["status"]["status_str"] == "success"
    assert (base / "models" / "dmdnet_identities" / "person2.safetensors").exists()
    result = queue(url, workflow("group_photo_identities_api.json"))
    assert result["status"]["status_str"] == "success", result["status"]
    saved = result["outputs"]["7"]["images"][0]
    assert (base / "output" / saved["subfolder"] / saved["filename"]).exists()
    assert len(result["outputs"]["8"]["images"]) == 2


def test_front_end_renders_the_nodes_with_widgets(server):
    url, base = server
    chromium = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed")
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph", timeout=60000)
        page.evaluate("async wf => await window.app.loadGraphData(wf)", workflow("group_photo_identities.json"))
        page.wait_for_timeout(1500)
        page.keyboard.press("Escape")  # the first-run template dialog would hide the graph
        page.wait_for_timeout(1000)
        widgets = page.evaluate(
            "() => Object.fromEntries(window.app.graph._nodes.map(n => [n.type, (n.widgets || []).map(w => w.name)]))")
        page.screenshot(path=str(base / "frontend.png"))
        browser.close()
    if os.environ.get("DMDNET_SCREENSHOTS"):
        shutil.copy(base / "frontend.png", Path(os.environ["DMDNET_SCREENSHOTS"]) / "comfyui_group_workflow.png")
    assert widgets["DMDNetRestoreFaces"] == ["strength", "match_threshold", "batch_size", "mode"]
    assert widgets["DMDNetDetectFaces"] == ["detector", "min_face_size", "max_faces", "largest_only"]
    assert widgets["DMDNetLoadIdentity"] == ["identity_name"]
    relevant = [e for e in errors if "DMDNet" in e or "node" in e.lower() or "Uncaught" in e]
    assert not relevant, relevant
