"""ComfyUI nodes for DMDNet: load, detect faces, build / save / load identities, restore.

Glue only: detection, alignment, identity matching, restoration and paste-back are
dmdnet_plugin's Restorer, the same code the CLI and the Gradio demo run. IMAGE is
[B, H, W, C] float in 0..1 and MASK is [B, H, W], as everywhere in ComfyUI.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths
from dmdnet_plugin.components import CROP_SIZE
from dmdnet_plugin.face_helper import MIN_FACE, AlignedFace, Detection, FaceHelper
from dmdnet_plugin.faces import DETECTORS, get_backend
from dmdnet_plugin.identity import IdentityDictionary
from dmdnet_plugin.io import Picture
from dmdnet_plugin.pipeline import DEFAULT_THRESHOLD, Mode, Restorer
from dmdnet_plugin.runtime import PRECISIONS, pick_precision
from dmdnet_plugin.weights import BUNDLED, load_model

MODEL_FOLDERS = ("dmdnet", "facerestore_models")
IDENTITY_FOLDER = "dmdnet_identities"
CATEGORY = "DMDNet"
MODE_HELP = ("auto: faces matching an identity use it, the rest generic; generic: ignore identities; "
             "identity: every face with the (single) identity; only-matched: unmatched faces stay as they are")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$")
log = logging.getLogger("dmdnet")


def register_folders() -> None:
    """models/dmdnet (plus the bundled demo checkpoint), models/facerestore_models, models/dmdnet_identities."""
    for name, exts in ((MODEL_FOLDERS[0], {".pth", ".safetensors"}), (MODEL_FOLDERS[1], {".pth", ".safetensors"}),
                       (IDENTITY_FOLDER, {".safetensors"})):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], exts)
    if BUNDLED.is_file():  # the demo checkpoint is listed where it ships, never copied
        folder_paths.add_model_folder_path(MODEL_FOLDERS[0], str(BUNDLED.parent))


register_folders()


@functools.lru_cache(maxsize=None)
def backend(detector: str = "auto"):
    """Face backends load their model files once per ComfyUI process."""
    return get_backend(detector)


@dataclass
class ModelHandle:
    """What flows on a DMDNET_MODEL wire: the net (kept on the offload device between runs)."""

    net: torch.nn.Module
    name: str
    device: str = "auto"  # "auto": ComfyUI's torch device

    def run_device(self) -> torch.device:
        return mm.get_torch_device() if self.device == "auto" else torch.device(self.device)


@dataclass(frozen=True)
class FacesWire:
    """What flows on a DMDNET_FACES wire: one detection (aligned faces) per image of the batch."""

    detections: tuple[Detection, ...]

    @property
    def faces(self) -> tuple[AlignedFace, ...]:
        return tuple(f for d in self.detections for f in d.faces)


def _pictures(image: torch.Tensor) -> list[Picture]:
    return [Picture(np.ascontiguousarray(img.cpu().float().numpy())) for img in image]


def _crops_image(crops: list[np.ndarray]) -> torch.Tensor:
    if not crops:
        return torch.zeros(1, CROP_SIZE, CROP_SIZE, 3)
    return torch.from_numpy(np.stack(crops)).float()


class _OnDevice:
    """Move the net to ComfyUI's torch device for one run and back to the offload device after."""

    def __init__(self, model: ModelHandle) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        device = self.model.run_device()
        mm.free_memory(mm.module_size(self.model.net) + 2 * 1024**3, device)  # weights + activations
        return self.model.net.to(device)

    def __exit__(self, *exc) -> None:
        self.model.net.to(mm.unet_offload_device())
        mm.soft_empty_cache()


def _progress():
    """A progress callback for Restorer.run: a ComfyUI bar over faces, and cancel between batches."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return update


class DMDNetModelLoader:
    """Loads a checkpoint from models/dmdnet (the bundled demo is listed there too) once per graph."""

    @classmethod
    def INPUT_TYPES(cls):
        names = sorted({n for f in MODEL_FOLDERS for n in folder_paths.get_filename_list(f)})
        return {"required": {
            "model_name": (names, {"tooltip": "checkpoint in models/dmdnet or models/facerestore_models"}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "auto: ComfyUI's device"}),
            "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "auto: fp16 on CUDA, fp32 on CPU"}),
        }}

    RETURN_TYPES = ("DMDNET_MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a DMDNet checkpoint (the authors' DMDNet.pth, .safetensors or a BasicSR checkpoint)."

    def load(self, model_name: str, device: str, precision: str):
        path = next((p for f in MODEL_FOLDERS if (p := folder_paths.get_full_path(f, model_name))), None)
        if path is None:
            raise FileNotFoundError(f"DMDNet checkpoint {model_name} not found in models/dmdnet")
        model = ModelHandle(None, model_name, device)
        model.net = load_model(path, device=mm.unet_offload_device(),
                               dtype=pick_precision(precision, model.run_device()))
        log.info("DMDNet Model Loader: %s", model.net.weights_source.notice())
        return (model,)


class DMDNetDetectFaces:
    """Finds and aligns faces once, so several Restore nodes (or a mask) can share them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "detector": (list(DETECTORS), {"default": "auto", "tooltip": DETECTORS["auto"]}),
            "min_face_size": ("INT", {"default": MIN_FACE, "min": 8, "max": 4096, "tooltip": "skip narrower faces (px)"}),
            "max_faces": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "0: all faces"}),
            "largest_only": ("BOOLEAN", {"default": False}),
        }}

    RETURN_TYPES = ("DMDNET_FACES", "IMAGE", "MASK")
    RETURN_NAMES = ("faces", "aligned_crops", "face_mask")
    FUNCTION = "detect"
    CATEGORY = CATEGORY
    DESCRIPTION = "Finds faces, aligns each to the 512x512 template and returns the crops and a mask of the face regions."

    def detect(self, image, detector, min_face_size, max_faces, largest_only):
        helper = FaceHelper(backend(detector), min_face=min_face_size, max_faces=max_faces or None,
                            only_largest=largest_only)
        wire = FacesWire(tuple(helper.find(_pictures(image))))
        if not wire.faces:
            log.warning("DMDNet Detect Faces: no face found")
        masks = FaceHelper.masks(wire.faces, [tuple(image.shape[1:3])] * image.shape[0])
        return (wire, _crops_image([f.crop for f in wire.faces]), torch.from_numpy(masks))


class DMDNetBuildIdentity:
    """Builds a person's identity dictionary from a few good photos (the largest face of each)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DMDNET_MODEL",),
            "reference_images": ("IMAGE", {"tooltip": "a few good photos of one person; the largest face of each is used"}),
            "name": ("STRING", {"default": "person"}),
        }, "optional": {
            "identities": ("DMDNET_IDENTITY", {"tooltip": "chain: identities to keep alongside the new one"}),
        }}

    RETURN_TYPES = ("DMDNET_IDENTITY",)
    RETURN_NAMES = ("identities",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Builds a person's identity dictionary from reference photos (once; save it to reuse)."

    def build(self, model, reference_images, name, identities=None):
        refs = [(f"reference {i + 1}", p.rgb()) for i, p in enumerate(_pictures(reference_images))]
        with _OnDevice(model) as net:
            ident, rejected = Restorer(net, FaceHelper(backend())).build_identity(refs, name=name or None)
        for reason in rejected:
            log.warning("DMDNet Build Identity: %s", reason)
        return (list(identities or []) + [ident],)


def identity_path(name: str) -> str:
    """The file for ``name`` in models/dmdnet_identities; a name can never leave that folder."""
    stem = name.removesuffix(".safetensors")
    if not _NAME_OK.match(stem) or ".." in stem:
        raise ValueError(f"invalid identity name {name!r}: use letters, digits, space, '_', '-' and '.'")
    folder = os.path.realpath(folder_paths.get_folder_paths(IDENTITY_FOLDER)[0])
    path = os.path.realpath(os.path.join(folder, stem + ".safetensors"))
    if os.path.dirname(path) != folder:
        raise ValueError(f"invalid identity name {name!r}")
    return path


class DMDNetSaveIdentity:
    """Saves an identity dictionary under models/dmdnet_identities; the name cannot leave that folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"identities": ("DMDNET_IDENTITY",), "name": ("STRING", {"default": "person"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves the (last) identity dictionary to models/dmdnet_identities/NAME.safetensors."

    def save(self, identities, name):
        path = identity_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        identities[-1].save(path)
        return {"ui": {"text": [f"saved {os.path.basename(path)} ({identities[-1].n_refs} references)"]}}


class DMDNetLoadIdentity:
    """Loads a saved identity dictionary; chain several so each face gets the nearest one."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"identity_name": (folder_paths.get_filename_list(IDENTITY_FOLDER),)},
                "optional": {"identities": ("DMDNET_IDENTITY", {"tooltip": "chain several identities"})}}

    RETURN_TYPES = ("DMDNET_IDENTITY",)
    RETURN_NAMES = ("identities",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a saved identity dictionary; chain several, each face gets the nearest one."

    def load(self, identity_name, identities=None):
        return (list(identities or []) + [IdentityDictionary.load(identity_path(identity_name))],)


class DMDNetRestoreFaces:
    """Restores every face of an image batch (photos or a clip's frames) and pastes them back."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("DMDNET_MODEL",),
            "image": ("IMAGE",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                         "tooltip": "blend of the restored faces over the original"}),
            "match_threshold": ("FLOAT", {"default": DEFAULT_THRESHOLD, "min": 0.0, "max": 2.0, "step": 0.01,
                                "tooltip": "largest face-embedding distance that counts as the same person"}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64}),
        }, "optional": {
            "faces": ("DMDNET_FACES", {"tooltip": "from DMDNet Detect Faces; detected here when absent"}),
            "identities": ("DMDNET_IDENTITY", {"tooltip": "each face is restored with the nearest identity, if close enough"}),
            "mode": ([m.value for m in Mode], {"default": Mode.AUTO.value, "tooltip": MODE_HELP}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "restored_faces")
    FUNCTION = "restore"
    CATEGORY = CATEGORY
    DESCRIPTION = "Restores every face (with its identity for faces that match one) and pastes them back."

    def restore(self, model, image, strength, match_threshold, batch_size, faces=None, identities=None,
                mode=Mode.AUTO.value):
        pictures = _pictures(image)
        with _OnDevice(model) as net:
            restorer = Restorer(net, FaceHelper(backend()), identities or (), threshold=match_threshold,
                                batch_size=batch_size)
            results = restorer.run(pictures, mode, strength=strength, progress=_progress(),
                                   detections=None if faces is None else faces.detections)
        restored = [f.restored for r in results for f in r.faces if f.restored is not None]
        if not any(r.faces for r in results):
            log.warning("DMDNet Restore Faces: no face found, the image passes through unchanged")
        return (torch.stack([torch.from_numpy(r.pixels) for r in results]).clamp(0, 1), _crops_image(restored))


NODE_CLASS_MAPPINGS = {
    "DMDNetModelLoader": DMDNetModelLoader,
    "DMDNetDetectFaces": DMDNetDetectFaces,
    "DMDNetBuildIdentity": DMDNetBuildIdentity,
    "DMDNetSaveIdentity": DMDNetSaveIdentity,
    "DMDNetLoadIdentity": DMDNetLoadIdentity,
    "DMDNetRestoreFaces": DMDNetRestoreFaces,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DMDNetModelLoader": "DMDNet Model Loader",
    "DMDNetDetectFaces": "DMDNet Detect Faces",
    "DMDNetBuildIdentity": "DMDNet Build Identity Dictionary",
    "DMDNetSaveIdentity": "DMDNet Save Identity Dictionary",
    "DMDNetLoadIdentity": "DMDNet Load Identity Dictionary",
    "DMDNetRestoreFaces": "DMDNet Restore Faces",
}
