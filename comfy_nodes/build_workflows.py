"""Writes the pack's ComfyUI templates (example_workflows/) from one description.

    python comfy_nodes/build_workflows.py

``example_workflows/<name>.json`` is the UI (LiteGraph) format that ComfyUI's template browser
lists, beside its ``<name>.jpg`` thumbnail (a screenshot of the real front end, taken by
tests/test_comfy_integration.py with DMDNET_THUMBNAILS). :func:`api_format` gives the same graph
in the API format for /prompt, so the two never drift apart. The templates run as they are: the
model is the bundled demo checkpoint, and the images are the bundled examples, which the pack
copies into ComfyUI's input folder as ``dmdnet_*.jpg`` (``comfy_nodes.nodes_dmdnet.EXAMPLE_INPUTS``).
"""

from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
# class -> (widget inputs in order, link inputs in order, outputs as (name, type))
NODE_SPECS: dict[str, tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]] = {
    "LoadImage": (["image", "upload"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageBatch": ([], [("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SaveImage": (["filename_prefix"], [("images", "IMAGE")], []),
    "UpscaleModelLoader": (["model_name"], [], [("UPSCALE_MODEL", "UPSCALE_MODEL")]),
    "ImageUpscaleWithModel": ([], [("upscale_model", "UPSCALE_MODEL"), ("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "DMDNetModelLoader": (["model_name", "device", "precision"], [], [("model", "DMDNET_MODEL")]),
    "DMDNetDetectFaces": (
        ["detector", "min_face", "max_faces", "only_largest"],
        [("image", "IMAGE")],
        [("faces", "DMDNET_FACES"), ("aligned_crops", "IMAGE"), ("face_mask", "MASK")],
    ),
    "DMDNetBuildIdentity": (
        ["name"],
        [("model", "DMDNET_MODEL"), ("reference_images", "IMAGE"), ("identities", "DMDNET_IDENTITY")],
        [("identities", "DMDNET_IDENTITY")],
    ),
    "DMDNetSaveIdentity": (["name"], [("identities", "DMDNET_IDENTITY")], []),
    "DMDNetLoadIdentity": (["identity_name"], [("identities", "DMDNET_IDENTITY")], [("identities", "DMDNET_IDENTITY")]),
    "DMDNetRestoreFaces": (
        ["strength", "threshold", "batch_size", "margin", "mode", "temporal", "frame_rate", "keep_colours"],
        [
            ("model", "DMDNET_MODEL"),
            ("image", "IMAGE"),
            ("faces", "DMDNET_FACES"),
            ("identities", "DMDNET_IDENTITY"),
            ("frame_rate", "FLOAT"),
        ],
        [("image", "IMAGE"), ("restored_faces", "IMAGE")],
    ),
    "LoadVideo": (["file", "upload"], [], [("VIDEO", "VIDEO")]),
    "GetVideoComponents": ([], [("video", "VIDEO")], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")]),
    "CreateVideo": (["fps"], [("images", "IMAGE"), ("audio", "AUDIO"), ("fps", "FLOAT")], [("VIDEO", "VIDEO")]),
    "SaveVideo": (["filename_prefix", "format", "codec"], [("video", "VIDEO")], []),
}
MODEL = "dmdnet_demo.safetensors"  # bundled, listed in place by the pack
UPSCALER = "RealESRGAN_x2plus.pth"  # not bundled: the user puts it in models/upscale_models (docs/background.md)
_REFS = {  # three reference photos of one person, batched
    1: ("LoadImage", ["dmdnet_obama_ref1.jpg", "image"], {}),
    2: ("LoadImage", ["dmdnet_obama_ref2.jpg", "image"], {}),
    3: ("LoadImage", ["dmdnet_obama_ref3.jpg", "image"], {}),
    4: ("ImageBatch", [], {"image1": (1, 0), "image2": (2, 0)}),
    5: ("ImageBatch", [], {"image1": (4, 0), "image2": (3, 0)}),
}

# name -> {node id: (class, widget values, {link input: (source id, output slot)})}
WORKFLOWS: dict[str, dict[int, tuple[str, list, dict[str, tuple[int, int]]]]] = {
    "dmdnet_restore_faces": {
        1: ("LoadImage", ["dmdnet_family.jpg", "image"], {}),
        2: ("DMDNetModelLoader", [MODEL, "auto", "auto"], {}),
        3: ("DMDNetRestoreFaces", [1.0, 0.52, 4, 0.05, "auto", False, 25.0, True], {"model": (2, 0), "image": (1, 0)}),
        4: ("SaveImage", ["dmdnet_restored"], {"images": (3, 0)}),
        5: ("SaveImage", ["dmdnet_restored_faces"], {"images": (3, 1)}),
    },
    "dmdnet_build_identity": {
        **_REFS,
        6: ("DMDNetModelLoader", [MODEL, "auto", "auto"], {}),
        7: ("DMDNetBuildIdentity", ["obama"], {"model": (6, 0), "reference_images": (5, 0)}),
        8: ("DMDNetSaveIdentity", ["obama"], {"identities": (7, 0)}),
    },
    # A batch of two photos; only the face that matches the identity is restored, the rest stay as they were.
    "dmdnet_restore_chosen_people": {
        **_REFS,
        6: ("DMDNetModelLoader", [MODEL, "auto", "auto"], {}),
        7: ("DMDNetBuildIdentity", ["obama"], {"model": (6, 0), "reference_images": (5, 0)}),
        8: ("LoadImage", ["dmdnet_obama_lowres.jpg", "image"], {}),
        9: ("LoadImage", ["dmdnet_family.jpg", "image"], {}),
        10: ("ImageBatch", [], {"image1": (8, 0), "image2": (9, 0)}),
        11: (
            "DMDNetRestoreFaces",
            [1.0, 0.52, 4, 0.05, "only-matched", False, 25.0, True],
            {"model": (6, 0), "image": (10, 0), "identities": (7, 0)},
        ),
        12: ("SaveImage", ["dmdnet_chosen_people"], {"images": (11, 0)}),
    },
    # A clip through ComfyUI's own video nodes: frames restored as a sequence (tracked, one identity per
    # person), then put back together with the clip's audio and frame rate.
    "dmdnet_restore_video": {
        **_REFS,
        6: ("DMDNetModelLoader", [MODEL, "auto", "auto"], {}),
        7: ("DMDNetBuildIdentity", ["obama"], {"model": (6, 0), "reference_images": (5, 0)}),
        8: ("LoadVideo", ["dmdnet_obama_clip.mp4", "image"], {}),
        9: ("GetVideoComponents", [], {"video": (8, 0)}),
        10: (
            "DMDNetRestoreFaces",
            [1.0, 0.52, 4, 0.05, "auto", True, 25.0, True],
            {"model": (6, 0), "image": (9, 0), "identities": (7, 0), "frame_rate": (9, 2)},
        ),
        11: ("CreateVideo", [25.0], {"images": (10, 0), "audio": (9, 1), "fps": (9, 2)}),
        12: ("SaveVideo", ["video/dmdnet_restored", "auto", "auto"], {"video": (11, 0)}),
    },
    # The whole photo, as GFPGAN's --bg_upsampler: ComfyUI's own upscale-model nodes enlarge it, then the
    # faces are restored on the enlarged photo and pasted at that size. The other order would paste each
    # restored face at the small size and let the upscale model redraw it, losing the restored detail.
    "dmdnet_restore_whole_photo": {
        1: ("LoadImage", ["dmdnet_family.jpg", "image"], {}),
        2: ("UpscaleModelLoader", [UPSCALER], {}),
        3: ("ImageUpscaleWithModel", [], {"upscale_model": (2, 0), "image": (1, 0)}),
        4: ("DMDNetModelLoader", [MODEL, "auto", "auto"], {}),
        5: ("DMDNetRestoreFaces", [1.0, 0.52, 4, 0.05, "auto", False, 25.0, True], {"model": (4, 0), "image": (3, 0)}),
        6: ("SaveImage", ["dmdnet_restored_whole"], {"images": (5, 0)}),
    },
}


def api_format(graph: dict) -> dict:
    prompt = {}
    for node_id, (cls, widgets, links) in graph.items():
        names = [w for w in NODE_SPECS[cls][0] if w != "upload"]
        inputs = dict(zip(names, widgets))
        inputs.update({name: [str(src), slot] for name, (src, slot) in links.items()})
        prompt[str(node_id)] = {"class_type": cls, "inputs": inputs}
    return prompt


def ui_format(graph: dict) -> dict:
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for node_id, (cls, _, inputs) in graph.items():
        for name, (src, slot) in inputs.items():
            link_id = len(links) + 1
            out_type = NODE_SPECS[graph[src][0]][2][slot][1]
            links.append([link_id, src, slot, node_id, [n for n, _ in NODE_SPECS[cls][1]].index(name), out_type])
            out_links.setdefault((src, slot), []).append(link_id)
    link_of = {(l[3], l[4]): l[0] for l in links}
    for order, (node_id, (cls, widgets, _)) in enumerate(graph.items()):
        _, link_inputs, outputs = NODE_SPECS[cls]
        nodes.append(
            {
                "id": node_id,
                "type": cls,
                "pos": [60 + 380 * (order % 4), 60 + 360 * (order // 4)],
                "size": [340, 300],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [
                    {
                        "name": n,
                        "type": t,
                        "link": link_of.get((node_id, i)),
                        **({"widget": {"name": n}} if n in NODE_SPECS[cls][0] else {}),
                    }
                    for i, (n, t) in enumerate(link_inputs)
                ],
                "outputs": [
                    {"name": n, "type": t, "links": out_links.get((node_id, i), []), "slot_index": i}
                    for i, (n, t) in enumerate(outputs)
                ],
                "properties": {"Node name for S&R": cls},
                "widgets_values": widgets,
            }
        )
    return {
        "last_node_id": max(graph),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def main(folder: Path = FOLDER) -> None:
    folder.mkdir(exist_ok=True)
    for name, graph in WORKFLOWS.items():
        (folder / f"{name}.json").write_text(json.dumps(ui_format(graph), indent=1) + "\n")


if __name__ == "__main__":
    main()
