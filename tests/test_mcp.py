"""The Gradio app as an MCP server: a real server on 127.0.0.1, driven by the mcp client SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import small_net
from PIL import Image

pytest.importorskip("gradio")
mcp = pytest.importorskip("mcp", reason='pip install "dmdnet-plugin[mcp]"')
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load_gradio import serve  # noqa: E402

from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.faces import DlibBackend  # noqa: E402
from dmdnet_plugin.weights import save_checkpoint  # noqa: E402

PHOTO = ROOT / "examples" / "photos" / "obama_lowres.jpg"
REFS = sorted((ROOT / "examples" / "refs" / "obama").glob("*.jpg"))[:2]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


async def session_calls(url: str, calls: list[tuple[str, dict]]) -> tuple[list, list]:
    """Connect as an agent's MCP client would, list the tools, then make the calls in order."""
    async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
        async with mcp.ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            return tools, [await session.call_tool(name, arguments) for name, arguments in calls]


def test_an_agent_restores_a_photo_and_builds_an_identity_over_mcp(tmp_path):
    weights = save_checkpoint(small_net(), tmp_path / "small.safetensors")
    rgb = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    refs = [data_url(p.read_bytes(), "image/jpeg") for p in REFS]
    calls = [
        ("restore_photo", {"photo": data_url(png(rgb))}),
        ("build_identity", {"name": "obama", "photo": refs[0], "photo_2": refs[1]}),
        ("list_identities", {}),
        ("restore_photo", {"photo": data_url(png(rgb)), "identity": "obama", "mode": "only-matched"}),
        ("restore_photo", {"photo": data_url(b"not an image at all")}),
        ("build_identity", {"name": "../escape", "photo": refs[0]}),
        ("restore_photo", {"photo": data_url(png(rgb)), "identity": "nobody"}),
    ]
    extra = ("--mcp", "--identities", str(tmp_path / "identities"))
    with serve(weights, tmp_path / "server.log", extra=extra) as (url, _):
        tools, results = asyncio.run(session_calls(url, calls))

    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"restore_photo", "build_identity", "list_identities"}  # the page's endpoints stay off
    schema = by_name["restore_photo"].inputSchema["properties"]
    assert set(schema) == {"photo", "identity", "mode", "strength"}
    assert all(schema[k].get("description") for k in schema) and "only-matched" in schema["mode"]["description"]
    assert "Restore every face" in by_name["restore_photo"].description

    generic, built, listed, chosen, broken, escape, unknown = results
    for result in (generic, built, listed, chosen):
        assert not result.isError, result.content
    restored = [c for c in generic.content if c.type == "image"]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(restored[0].data))).convert("RGB"))
    faces = FaceHelper(DlibBackend("hog")).detect(rgb.astype(np.float32) / 255).faces
    inside = FaceHelper.masks(faces, [rgb.shape[:2]])[0] > 0
    change = np.abs(out.astype(int) - rgb).max(-1)
    assert out.shape == rgb.shape and len(faces) == 1
    assert change[inside].mean() > 3, change[inside].mean()  # the face was restored
    np.testing.assert_array_equal(out[~inside], rgb[~inside])  # the rest is the photo, to the pixel
    assert "saved identity 'obama' from 2 photo(s)" in built.content[0].text
    assert listed.content[0].text == "obama" and (tmp_path / "identities" / "obama.safetensors").is_file()
    assert any(c.type == "image" for c in chosen.content)

    assert broken.isError and "not an image" in broken.content[0].text, broken.content
    assert escape.isError and "invalid identity name '../escape'" in escape.content[0].text
    assert unknown.isError and "nobody.safetensors: no such identity dictionary" in unknown.content[0].text
    assert not list((tmp_path / "identities").glob("*escape*")) and not (tmp_path / "escape.safetensors").exists()
