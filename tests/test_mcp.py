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
import torch
from conftest import small_net
from parity_inputs import load_parity_inputs
from PIL import Image

pytest.importorskip("gradio")
mcp = pytest.importorskip("mcp", reason='pip install "dmdnet-plugin[mcp]"')
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from load_gradio import peak_rss_mb, serve  # noqa: E402

from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.faces import DlibBackend  # noqa: E402
from dmdnet_plugin.io import MAX_PIXELS  # noqa: E402
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


def unusable_identities(folder: Path, outside: Path) -> list[str]:
    """Files in the identities folder that must never be offered or used: broken, a pickle under the
    right suffix, a link to a (valid) dictionary outside the folder, a folder."""
    inputs = load_parity_inputs()
    small_net().encode_identity(inputs["refs"][:1], inputs["ref_boxes"][:1], name="outside").save(outside)
    folder.mkdir()
    (folder / "corrupt.safetensors").write_bytes(b"\x00" * 40)
    torch.save({"atoms": torch.zeros(2)}, folder / "pickle.safetensors")
    (folder / "outside.safetensors").symlink_to(outside)
    (folder / "folder.safetensors").mkdir()
    return sorted(p.name for p in folder.iterdir())


def test_an_agent_restores_a_photo_and_builds_an_identity_over_mcp(tmp_path, monkeypatch):
    weights = save_checkpoint(small_net(), tmp_path / "small.safetensors")
    ids = tmp_path / "identities"
    planted = unusable_identities(ids, tmp_path / "outside.safetensors")
    rgb = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    refs = [data_url(p.read_bytes(), "image/jpeg") for p in REFS]
    huge = tmp_path / "huge.png"  # over the pixel limit, less than twice it (where Pillow only warns)
    cv2.imwrite(str(huge), np.zeros((11000, 11000), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])  # 118 kB
    calls = [
        ("restore_photo", {"photo": data_url(png(rgb))}),
        ("build_identity", {"name": "obama", "photo": refs[0], "photo_2": refs[1]}),
        ("list_identities", {}),
        ("restore_photo", {"photo": data_url(png(rgb)), "identity": "obama", "mode": "only-matched"}),
        ("restore_photo", {"photo": data_url(b"not an image at all")}),
        ("build_identity", {"name": "../escape", "photo": refs[0]}),
        ("restore_photo", {"photo": data_url(png(rgb)), "identity": "nobody"}),
        ("build_identity", {"name": "obama", "photo": refs[0]}),
        ("build_identity", {"name": "obama", "photo": refs[0], "replace": True}),
        ("build_identity", {"name": "newline\n", "photo": refs[0]}),
        ("restore_photo", {"photo": data_url(png(rgb)), "identity": "outside"}),
        ("restore_photo", {"photo": data_url(png(rgb)), "mode": "generic", "upscale": 2}),
        ("restore_photo", {"photo": data_url(huge.read_bytes())}),
    ]
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the server's temporary files, gradio's cache included
    (tmp_path / "tmp").mkdir()
    with serve(weights, tmp_path / "server.log", extra=("--mcp", "--identities", str(ids))) as (url, pid):
        tools, results = asyncio.run(session_calls(url, calls))
        peak_mb = peak_rss_mb(pid)
    left = [p.relative_to(tmp_path / "tmp") for p in (tmp_path / "tmp").rglob("*")]

    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"restore_photo", "build_identity", "list_identities"}  # the page's endpoints stay off
    schema = by_name["restore_photo"].inputSchema["properties"]
    assert set(schema) == {"photo", "identity", "mode", "strength", "upscale"}
    assert all(schema[k].get("description") for k in schema) and "only-matched" in schema["mode"]["description"]
    assert "Restore every face" in by_name["restore_photo"].description
    assert (
        "replace an identity already saved"
        in by_name["build_identity"].inputSchema["properties"]["replace"]["description"]
    )

    generic, built, listed, chosen, broken, escape, unknown, again, replaced, newline, outside, upscaled, too_big = (
        results
    )
    for result in (generic, built, listed, chosen, replaced, upscaled):
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
    assert listed.content[0].text == "obama"  # of the files in the folder, the one that loads
    assert any(c.type == "image" for c in chosen.content)
    bigger = [c for c in upscaled.content if c.type == "image"][0]
    assert Image.open(io.BytesIO(base64.b64decode(bigger.data))).size == (2 * rgb.shape[1], 2 * rgb.shape[0])

    refused = {"broken": broken, "escape": escape, "unknown": unknown, "again": again, "newline": newline}
    refused |= {"outside": outside, "too big": too_big}
    assert all(r.isError for r in refused.values()), refused
    errors = {name: r.content[0].text for name, r in refused.items()}
    assert "not an image" in errors["broken"]
    assert "invalid identity name '../escape'" in errors["escape"]
    assert "no saved identity 'nobody': list_identities gives the names" in errors["unknown"]
    assert "identity 'obama' already exists; pass replace=true to replace it" in errors["again"]
    assert "saved identity 'obama' from 1 photo(s)" in replaced.content[0].text
    assert "invalid identity name 'newline\\n'" in errors["newline"]
    assert "identity 'outside' links to a file outside its folder" in errors["outside"]
    assert f"more than the limit of {MAX_PIXELS}" in errors["too big"] and "file.png" in errors["too big"], errors[
        "too big"
    ]
    assert not any(str(tmp_path) in text for text in errors.values()), errors
    assert sorted(p.name for p in ids.iterdir()) == sorted([*planted, "obama.safetensors"])  # no escape, no newline
    assert not (tmp_path / "escape.safetensors").exists()

    assert peak_mb < 2048, peak_mb  # the huge photo was refused before it was decoded
    # a stopped server leaves none of its own temporary files, and gradio removes its copies of the results
    assert not [p for p in left if p.parts[0].startswith("dmdnet_") or p.name.startswith("restored_")], left
