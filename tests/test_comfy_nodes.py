"""ComfyUI nodes against a minimal stand-in for comfy's modules (tests/comfy_stub).

The real server is exercised by tests/test_comfy_integration.py when COMFYUI_PATH is set.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

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
    sys.path.insert(0, str(Path(__file__).parent / "comfy_stub"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("dmdnet_custom_node", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["dmdnet_custom_node"] = pack
    spec.loader.exec_module(pack)
    from dmdnet_plugin.weights import save_checkpoint

    (models / "dmdnet").mkdir()
    save_checkpoint(small_net(), models / "dmdnet" / "dmdnet.safetensors")
    yield pack, models
    sys.path.remove(str(Path(__file__).parent / "comfy_stub"))


def test_node_contracts(comfy):
    pack, _ = comfy
    nodes = pack.NODE_CLASS_MAPPINGS
    assert set(nodes) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(nodes) == 6
    for name, cls in nodes.items():
        spec = cls.INPUT_TYPES()
        declared = list(spec["required"]) + list(spec.get("optional", {}))
        params = list(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)[1:]
        assert params == declared, name
        assert cls.CATEGORY == "DMDNet" and cls.DESCRIPTION
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("DMDNet ")
    assert nodes["DMDNetSaveIdentity"].OUTPUT_NODE
    listed = nodes["DMDNetModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert listed == ["dmdnet.safetensors", "dmdnet_demo.safetensors"]  # the bundled demo, where it ships


def test_workflow_builder_matches_the_nodes_and_the_files(comfy, tmp_path):
    pack, _ = comfy
    sys.path.insert(0, str(ROOT / "comfy_nodes" / "workflows"))
    import build_workflows as bw

    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        widgets, links, outputs = bw.NODE_SPECS[name]
        spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        is_widget = [n for n in spec if isinstance(spec[n][0], list) or spec[n][0] in ("INT", "FLOAT", "BOOLEAN", "STRING")]
        assert is_widget == widgets, name
        assert [(n, spec[n][0]) for n, _ in links] == links, name
        assert [t for _, t in outputs] == list(cls.RETURN_TYPES), name
        assert [n for n, _ in outputs] == list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)), name
    bw.main(tmp_path)
    for path in tmp_path.iterdir():
        assert json.loads(path.read_text()) == json.loads((ROOT / "comfy_nodes" / "workflows" / path.name).read_text())
    assert len(list(tmp_path.iterdir())) == 6


# ----------------------------------------------------------- a small executor for API prompts
def _load_image(folder: Path, image: str):
    rgb = cv2.cvtColor(cv2.imread(str(folder / image)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    return torch.from_numpy(rgb)[None], torch.zeros(1, *rgb.shape[:2])


def _image_batch(image1, image2):
    if image2.shape[1:3] != image1.shape[1:3]:
        image2 = torch.nn.functional.interpolate(image2.movedim(-1, 1), image1.shape[1:3], mode="bilinear").movedim(1, -1)
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
            elif cls == "SaveImage":
                for i, img in enumerate(args["images"]):
                    out = (img.numpy() * 255).round().astype(np.uint8)
                    cv2.imwrite(str(outputs / f"{args['filename_prefix']}_{i:05d}_.png"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
                results[node_id] = ()
            else:
                node_cls = pack.NODE_CLASS_MAPPINGS[cls]
                out = getattr(node_cls(), node_cls.FUNCTION)(**args)
                results[node_id] = out if isinstance(out, tuple) else ()
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
    return json.loads((ROOT / "comfy_nodes" / "workflows" / f"{name}_api.json").read_text())


def test_example_workflows_run(comfy, tmp_path):
    pack, models = comfy
    import comfy.model_management as mm
    import comfy.utils

    inputs, outputs = tmp_path / "input", tmp_path / "output"
    prepare_inputs(inputs)
    outputs.mkdir()
    results = run_prompt(pack, workflow("generic_restore"), inputs, outputs)
    image, faces = results["3"]
    assert image.shape == (1, 640, 437, 3) and faces.shape == (3, 512, 512, 3)
    assert (outputs / "dmdnet_generic_00000_.png").exists()
    assert comfy.utils.updates[-1] == (3, 3)  # progress counted faces
    assert ("soft_empty_cache",) in mm.calls and any(c[0] == "free_memory" for c in mm.calls)

    # identities: "obama" from the example refs, then two people for the group photo
    prompt = workflow("build_identity")
    run_prompt(pack, prompt, inputs, outputs)
    assert (models / "dmdnet_identities" / "obama.safetensors").exists()
    for person, prefix in (("obama", "p1_"), ("person2", "p2_")):
        for i in (1, 2, 3):
            prompt[str(i)]["inputs"]["image"] = f"{prefix}{i}.jpg"
        prompt["7"]["inputs"]["name"] = prompt["8"]["inputs"]["name"] = person
        run_prompt(pack, prompt, inputs, outputs)
    results = run_prompt(pack, workflow("group_photo_identities"), inputs, outputs)
    image, faces = results["6"]
    assert image.shape == (1, 512, 1024, 3) and faces.shape == (2, 512, 512, 3)
    detected = results["3"][0].faces
    with pytest.raises(dataclasses.FrozenInstanceError):  # the detector's cached output cannot be changed
        detected[0].crop = None
    assert (outputs / "dmdnet_group_00000_.png").exists()
    mask = results["3"][2]
    assert mask.shape == (1, 512, 1024) and mask.max() == 1 and mask[0, 5, 5] == 0


def test_restore_matches_identities_per_face_and_passes_through_without_faces(comfy, tmp_path):
    pack, _ = comfy
    nodes = pack.NODE_CLASS_MAPPINGS
    prepare_inputs(tmp_path)
    model = nodes["DMDNetModelLoader"]().load("dmdnet.safetensors", "auto", "auto")[0]
    refs = torch.cat([_load_image(tmp_path, f"p2_{i}.jpg")[0] for i in (1, 2)])
    identities = nodes["DMDNetBuildIdentity"]().build(model, refs, "person2")[0]
    group = _load_image(tmp_path, "group.jpg")[0]
    faces = nodes["DMDNetDetectFaces"]().detect(group, "hog", 24, 0, False)[0]
    out, crops = nodes["DMDNetRestoreFaces"]().restore(model, group, 1.0, 0.5, 4, faces, identities)
    assert crops.shape[0] == 2
    sky = torch.full((1, 300, 400, 3), 0.6)
    out, crops = nodes["DMDNetRestoreFaces"]().restore(model, sky, 1.0, 0.5, 4)
    assert torch.equal(out, sky) and crops.shape == (1, 512, 512, 3)
    weak, _ = nodes["DMDNetRestoreFaces"]().restore(model, group, 0.0, 0.5, 4)
    assert torch.allclose(weak, group, atol=1 / 255)  # strength 0 keeps the photo


def test_interruption_is_checked_between_faces(comfy, tmp_path):
    pack, _ = comfy
    import comfy.model_management as mm

    prepare_inputs(tmp_path)
    nodes = pack.NODE_CLASS_MAPPINGS
    model = nodes["DMDNetModelLoader"]().load("dmdnet.safetensors", "cpu", "fp32")[0]
    mm.interrupted = True
    with pytest.raises(mm.InterruptProcessingException):
        nodes["DMDNetRestoreFaces"]().restore(model, _load_image(tmp_path, "family.jpg")[0], 1.0, 0.5, 1)


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/passwd", "..", "", ".hidden", "x" * 200, "a\\b"])
def test_identity_names_cannot_leave_their_folder(comfy, name):
    pack, _ = comfy
    node = sys.modules["dmdnet_custom_node.comfy_nodes.nodes_dmdnet"]
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
    nodes = pack.NODE_CLASS_MAPPINGS
    weights = models / "dmdnet" / "dmdnet.safetensors"
    photo = tmp_path / "obama.png"  # lossless, so that files can be compared to the pixel
    cv2.imwrite(str(photo), cv2.imread(str(ROOT / "examples" / "photos" / "obama_lowres.jpg")))
    identity = models / "dmdnet_identities" / "obama.safetensors"
    assert main(["identity", "build", str(ROOT / "examples" / "refs" / "obama"), "-o", str(identity),
                 "--name", "obama", "--weights", str(weights)]) == 0
    assert main(["restore", str(photo), "-o", str(tmp_path / "cli"), "--weights", str(weights),
                 "--identity", str(identity), "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["files"][0]["faces"][0]["identity"] == "obama"
    by_cli = read_image(tmp_path / "cli" / "obama.png").pixels

    gradio_app.SETTINGS.weights, gradio_app.SETTINGS.device = str(weights), "cpu"
    gradio_app._SHARED.clear()
    out = gradio_app.restore(str(photo), None, str(identity), "auto", 1.0, 1.0, False, progress=lambda *a, **k: None)
    gradio_app._SHARED.clear()
    by_gradio = read_image(out[4]).pixels

    model = nodes["DMDNetModelLoader"]().load("dmdnet.safetensors", "cpu", "auto")[0]
    identities = nodes["DMDNetLoadIdentity"]().load("obama.safetensors")[0]
    image = _load_image(tmp_path, "obama.png")[0]
    restored = nodes["DMDNetRestoreFaces"]().restore(model, image, 1.0, 0.5, 4, identities=identities)[0]
    by_comfy = (restored[0].numpy() * 255).round().astype(np.uint8)

    assert np.abs(by_cli.astype(int) - read_image(photo).pixels).mean() > 1  # the face was restored
    np.testing.assert_array_equal(by_gradio, by_cli)
    np.testing.assert_array_equal(by_comfy, by_cli)
