"""ComfyUI nodes for DMDNet (V3 schema): load, detect faces, build / save / load identities, restore.

Glue only: detection, alignment, identity matching, restoration and paste-back are
dmdnet_plugin's Restorer, the same code the CLI and the Gradio demo run. IMAGE is
[B, H, W, C] float in 0..1 and MASK is [B, H, W], as everywhere in ComfyUI. Written like
ComfyUI's own comfy_extras nodes: ``io.ComfyNode`` classes with ``define_schema`` and
``execute``, listed by a ``ComfyExtension`` (``comfy_entrypoint``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io

from dmdnet_plugin.clips import ClipStatus, restore_clip
from dmdnet_plugin.components import CROP_SIZE
from dmdnet_plugin.face_helper import MIN_FACE, AlignedFace, Detection, FaceHelper
from dmdnet_plugin.faces import DETECTORS, shared_backend
from dmdnet_plugin.factory import load_restorer
from dmdnet_plugin.identity import IdentityDictionary, identity_file
from dmdnet_plugin.io import Picture, check_pixels
from dmdnet_plugin.matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from dmdnet_plugin.pipeline import Mode
from dmdnet_plugin.runtime import PRECISIONS, pick_precision
from dmdnet_plugin.weights import (
    BUNDLED,
    OFFICIAL_NAME,
    URL_ENV,
    LoadedModel,
    WeightsError,
    download_official,
    load_model,
    official_url,
)

MODEL_FOLDERS = ("dmdnet", "facerestore_models")
IDENTITY_FOLDER = "dmdnet_identities"
DOWNLOAD_ENTRY = f"{OFFICIAL_NAME} (download)"  # fetches the authors' file into models/dmdnet when it is not there
CATEGORY = "DMDNet"
MODE_HELP = (
    "auto: faces matching an identity use it, the rest generic; generic: ignore identities; "
    "identity: every face with the (single) identity; only-matched: only the faces that match one of the "
    "identities are restored, every other face stays exactly as it was"
)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_INPUTS = {  # name in ComfyUI's input folder -> bundled example; the templates load these
    "dmdnet_family.jpg": "photos/family.jpg",
    "dmdnet_obama_lowres.jpg": "photos/obama_lowres.jpg",
    **{f"dmdnet_obama_ref{i}.jpg": f"refs/obama/o{i}.jpg" for i in (1, 2, 3)},
    "dmdnet_obama_clip.mp4": "video/obama_jitter.mp4",
}
log = logging.getLogger("dmdnet")
ModelType = io.Custom("DMDNET_MODEL")  # a ModelHandle
FacesType = io.Custom("DMDNET_FACES")  # a FacesWire
IdentitiesType = io.Custom("DMDNET_IDENTITY")  # a list of IdentityDictionary, nearest wins per face


def register_folders() -> None:
    """models/dmdnet (plus the bundled demo checkpoint), models/facerestore_models, models/dmdnet_identities.

    Through ``folder_paths.add_model_folder_path``, so that folders an ``extra_model_paths.yaml``
    already added for these names are kept (ComfyUI reads it before it loads custom nodes), and the
    default folder goes first; then the file extensions are set, which that function leaves empty.
    """
    for name, exts in (
        (MODEL_FOLDERS[0], {".pth", ".safetensors"}),
        (MODEL_FOLDERS[1], {".pth", ".safetensors"}),
        (IDENTITY_FOLDER, {".safetensors"}),
    ):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        paths, known = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(known) | exts)
    if BUNDLED.is_file():  # the demo checkpoint is listed where it ships, never copied
        folder_paths.add_model_folder_path(MODEL_FOLDERS[0], str(BUNDLED.parent))


def install_example_inputs() -> None:
    """Copy the bundled example photos into ComfyUI's input folder, so that the templates in
    example_workflows/ run as they are. Small files, copied once; a user's file is never replaced."""
    target = Path(folder_paths.get_input_directory())
    for name, source in EXAMPLE_INPUTS.items():
        if not (target / name).exists() and (EXAMPLES / source).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EXAMPLES / source, target / name)


def run_device(device: str) -> torch.device:
    """Where a node runs: "auto" is ComfyUI's torch device."""
    return mm.get_torch_device() if device == "auto" else torch.device(device)


@dataclass(frozen=True)
class ModelHandle:
    """What flows on a DMDNET_MODEL wire: the loaded model (its net kept on the offload device
    between runs), the file it came from and where it runs."""

    model: LoadedModel
    name: str
    device: str = "auto"  # "auto": ComfyUI's torch device


@dataclass(frozen=True)
class FacesWire:
    """What flows on a DMDNET_FACES wire: one detection (aligned faces) per image of the batch."""

    detections: tuple[Detection, ...]

    @property
    def faces(self) -> tuple[AlignedFace, ...]:
        return tuple(f for d in self.detections for f in d.faces)


def _pictures(image: torch.Tensor, node: str, min_face: int = MIN_FACE) -> list[Picture]:
    """The batch as Pictures; an empty batch, or images too small to hold a face, get a node error
    that says so instead of failing later inside detection or ``torch.stack``."""
    if image.dim() != 4 or image.shape[0] == 0:
        raise ValueError(f"{node}: the image batch is empty (shape {tuple(image.shape)})")
    h, w = image.shape[1:3]
    if min(h, w) < min_face:
        raise ValueError(f"{node}: the images are {w}x{h} px, too small to hold a face of {min_face} px")
    check_pixels(w, h, f"{node}: the image batch")  # the limit of every surface, before any copy
    return [Picture(np.ascontiguousarray(img.cpu().float().numpy())) for img in image]


def _crops_image(crops: list[np.ndarray]) -> torch.Tensor:
    if not crops:
        return torch.zeros(1, CROP_SIZE, CROP_SIZE, 3)
    return torch.from_numpy(np.stack(crops)).float()


class _OnDevice:
    """Move the net to the handle's device for one run and back to the offload device after."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle

    def __enter__(self) -> LoadedModel:
        net, device = self.handle.model.net, run_device(self.handle.device)
        mm.free_memory(mm.module_size(net) + 2 * 1024**3, device)  # weights + activations
        net.to(device)
        return self.handle.model

    def __exit__(self, *exc) -> None:
        self.handle.model.net.to(mm.unet_offload_device())
        mm.soft_empty_cache()


def _progress():
    """A progress callback for restore_clip: a ComfyUI bar over the faces being restored, and
    cancel between frames while tracking and between model calls while restoring."""
    bar = None

    def update(status: ClipStatus) -> None:
        nonlocal bar
        if status.stage == "restoring" and status.n_faces:
            bar = bar or comfy.utils.ProgressBar(status.n_faces)
            bar.update_absolute(status.faces_done, status.n_faces)
        mm.throw_exception_if_processing_interrupted()

    return update


def _download_official() -> str:
    """The authors' DMDNet.pth into models/dmdnet, once, with ComfyUI's progress bar and the CLI's
    integrity check (a strict load: a partial, HTML or foreign file never lands)."""
    target = Path(folder_paths.get_folder_paths(MODEL_FOLDERS[0])[0]) / OFFICIAL_NAME
    url, bar = official_url(), None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        bar = bar or comfy.utils.ProgressBar(total or 0)
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    log.info("DMDNet Model Loader: downloading %s from %s", OFFICIAL_NAME, url)
    try:  # progress is called every 0.2 s even while the server is silent, so a cancel stops it at once
        return str(download_official(url, target, progress=progress))
    except mm.InterruptProcessingException:
        log.info("DMDNet Model Loader: download of %s cancelled; nothing was kept", OFFICIAL_NAME)
        raise
    except WeightsError as exc:
        raise RuntimeError(
            f"DMDNet Model Loader: downloading {OFFICIAL_NAME} failed: {exc}. Download it yourself from {url} "
            f"and put it in {target.parent}, or set {URL_ENV} to a mirror"
        ) from None


class DMDNetModelLoader(io.ComfyNode):
    """Loads a checkpoint from models/dmdnet (the bundled demo is listed there too) once per graph;
    the authors' DMDNet.pth is also listed as a download, fetched the first time it is chosen."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        # The download entry stays listed once the file is there (then it loads it), so that a graph
        # saved with it still validates.
        names = sorted({n for f in MODEL_FOLDERS for n in folder_paths.get_filename_list(f)}) + [DOWNLOAD_ENTRY]
        return io.Schema(
            node_id="DMDNetModelLoader",
            display_name="DMDNet Model Loader",
            category=CATEGORY,
            description="Loads a DMDNet checkpoint (the authors' DMDNet.pth, .safetensors or a BasicSR checkpoint).",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=names,
                    tooltip="checkpoint in models/dmdnet or models/facerestore_models (the bundled "
                    f"dmdnet_demo.safetensors is a small demo model); '{DOWNLOAD_ENTRY}' fetches the authors' "
                    "weights into models/dmdnet the first time, then loads them",
                ),
                io.Combo.Input(
                    "device", options=["auto", "cpu", "cuda"], default="auto", tooltip="auto: ComfyUI's device"
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="auto: fp16 on CUDA; on CPU bf16 where native and faster, else fp32",
                ),
            ],
            outputs=[
                ModelType.Output(
                    display_name="model", tooltip="the loaded DMDNet, kept on the offload device between runs"
                )
            ],
        )

    @classmethod
    def execute(cls, model_name: str, device: str, precision: str) -> io.NodeOutput:
        name = OFFICIAL_NAME if model_name == DOWNLOAD_ENTRY else model_name
        path = next((p for f in MODEL_FOLDERS if (p := folder_paths.get_full_path(f, name))), None)
        if path is None and model_name == DOWNLOAD_ENTRY:
            path = _download_official()
        if path is None:
            raise FileNotFoundError(f"DMDNet checkpoint {model_name} not found in models/dmdnet")
        loaded = load_model(
            path, device=mm.unet_offload_device(), precision=pick_precision(precision, run_device(device))
        )
        log.info("DMDNet Model Loader: %s", loaded.notice())
        return io.NodeOutput(ModelHandle(loaded, name, device))


class DMDNetDetectFaces(io.ComfyNode):
    """Finds and aligns faces once, so several Restore nodes (or a mask) can share them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMDNetDetectFaces",
            display_name="DMDNet Detect Faces",
            category=CATEGORY,
            description="Finds faces, aligns each to the 512x512 template and returns the crops and a mask of the "
            "face regions.",
            inputs=[
                io.Image.Input("image", tooltip="photos or a clip's frames"),
                io.Combo.Input("detector", options=list(DETECTORS), default="auto", tooltip=DETECTORS["auto"]),
                io.Int.Input("min_face", default=MIN_FACE, min=8, max=4096, tooltip="skip narrower faces (px)"),
                io.Int.Input("max_faces", default=0, min=0, max=256, tooltip="0: all faces"),
                io.Boolean.Input("only_largest", default=False, tooltip="keep only the largest face of each image"),
            ],
            outputs=[
                FacesType.Output(display_name="faces", tooltip="the aligned faces, for DMDNet Restore Faces"),
                io.Image.Output(display_name="aligned_crops", tooltip="each face aligned to 512x512"),
                io.Mask.Output(display_name="face_mask", tooltip="1 inside the face regions, per image"),
            ],
        )

    @classmethod
    def execute(
        cls, image: torch.Tensor, detector: str, min_face: int, max_faces: int, only_largest: bool
    ) -> io.NodeOutput:
        helper = FaceHelper(
            shared_backend(detector, device=mm.get_torch_device().type),
            min_face=min_face,
            max_faces=max_faces or None,
            only_largest=only_largest,
        )
        wire = FacesWire(tuple(helper.find(_pictures(image, "DMDNet Detect Faces", min_face))))
        if not wire.faces:
            log.warning("DMDNet Detect Faces: no face found")
        masks = FaceHelper.masks(wire.faces, [tuple(image.shape[1:3])] * image.shape[0])
        return io.NodeOutput(wire, _crops_image([f.crop for f in wire.faces]), torch.from_numpy(masks))


class DMDNetBuildIdentity(io.ComfyNode):
    """Builds a person's identity dictionary from a few good photos (the largest face of each)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMDNetBuildIdentity",
            display_name="DMDNet Build Identity Dictionary",
            category=CATEGORY,
            description="Builds a person's identity dictionary from reference photos (once; save it to reuse).",
            inputs=[
                ModelType.Input("model", tooltip="from DMDNet Model Loader; a dictionary fits only this model"),
                io.Image.Input(
                    "reference_images", tooltip="a few good photos of one person; the largest face of each is used"
                ),
                io.String.Input("name", default="person", tooltip="the person's name, shown in reports"),
                IdentitiesType.Input(
                    "identities", optional=True, tooltip="chain: identities to keep alongside the new one"
                ),
            ],
            outputs=[
                IdentitiesType.Output(display_name="identities", tooltip="the chained identities and the new one")
            ],
        )

    @classmethod
    def execute(
        cls, model: ModelHandle, reference_images: torch.Tensor, name: str, identities: list | None = None
    ) -> io.NodeOutput:
        pictures = _pictures(reference_images, "DMDNet Build Identity")
        refs = [(f"reference {i + 1}", p.rgb()) for i, p in enumerate(pictures)]
        with _OnDevice(model) as loaded:
            ident, rejected = load_restorer(loaded).build_identity(refs, name=name or None)
        for reason in rejected:
            log.warning("DMDNet Build Identity: %s", reason)
        return io.NodeOutput(list(identities or []) + [ident])


def identity_path(name: str) -> str:
    """The file for ``name`` in models/dmdnet_identities; a name can never leave that folder."""
    return str(identity_file(folder_paths.get_folder_paths(IDENTITY_FOLDER)[0], name))


class DMDNetSaveIdentity(io.ComfyNode):
    """Saves an identity dictionary under models/dmdnet_identities; the name cannot leave that folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMDNetSaveIdentity",
            display_name="DMDNet Save Identity Dictionary",
            category=CATEGORY,
            description="Saves the (last) identity dictionary to models/dmdnet_identities/NAME.safetensors.",
            inputs=[
                IdentitiesType.Input("identities", tooltip="the last of the chain is saved"),
                io.String.Input("name", default="person", tooltip="file name: letters, digits, space, '_', '-', '.'"),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, identities: list, name: str) -> io.NodeOutput:
        path = identity_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        identities[-1].save(path)
        return io.NodeOutput(ui={"text": [f"saved {os.path.basename(path)} ({identities[-1].n_refs} references)"]})


class DMDNetLoadIdentity(io.ComfyNode):
    """Loads a saved identity dictionary; chain several so each face gets the nearest one."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMDNetLoadIdentity",
            display_name="DMDNet Load Identity Dictionary",
            category=CATEGORY,
            description="Loads a saved identity dictionary; chain several, each face gets the nearest one.",
            inputs=[
                io.Combo.Input(
                    "identity_name",
                    options=folder_paths.get_filename_list(IDENTITY_FOLDER),
                    tooltip="a dictionary in models/dmdnet_identities",
                ),
                IdentitiesType.Input("identities", optional=True, tooltip="chain several identities"),
            ],
            outputs=[IdentitiesType.Output(display_name="identities", tooltip="the chained identities and this one")],
        )

    @classmethod
    def execute(cls, identity_name: str, identities: list | None = None) -> io.NodeOutput:
        return io.NodeOutput(list(identities or []) + [IdentityDictionary.load(identity_path(identity_name))])


class DMDNetRestoreFaces(io.ComfyNode):
    """Restores every face of an image batch (photos or a clip's frames) and pastes them back."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DMDNetRestoreFaces",
            display_name="DMDNet Restore Faces",
            category=CATEGORY,
            description="Restores every face (with its identity for faces that match one) and pastes them back.",
            inputs=[
                ModelType.Input("model", tooltip="from DMDNet Model Loader"),
                io.Image.Input("image", tooltip="photos or a clip's frames"),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="blend of the restored faces over the original",
                ),
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="largest face-embedding distance that counts as the same person",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="faces per model call"),
                io.Float.Input(
                    "margin",
                    default=DEFAULT_MARGIN,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="the nearest identity must be this much nearer than the second-nearest, or "
                    "the face stays unmatched (0: the nearest wins)",
                ),
                FacesType.Input("faces", optional=True, tooltip="from DMDNet Detect Faces; detected here when absent"),
                IdentitiesType.Input(
                    "identities",
                    optional=True,
                    tooltip="each face is restored with the nearest identity, if close enough",
                ),
                io.Combo.Input(
                    "mode", options=[m.value for m in Mode], default=Mode.AUTO.value, optional=True, tooltip=MODE_HELP
                ),
                io.Boolean.Input(
                    "temporal",
                    default=False,
                    optional=True,
                    tooltip="the batch is a clip's frames, in order: track each face, align it steadily, "
                    "smooth it over time and give it one identity for the whole clip",
                ),
                io.Float.Input(
                    "frame_rate",
                    default=25.0,
                    min=1.0,
                    max=240.0,
                    step=1.0,
                    optional=True,
                    tooltip="the clip's frames per second (with temporal; wire Get Video Components' fps)",
                ),
                io.Boolean.Input(
                    "keep_colours",
                    default=True,
                    optional=True,
                    tooltip="restored faces keep the image's broad colours and take only fine detail "
                    "from the model (off: the model's colours, which may drift)",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="the images with the restored faces pasted back"),
                io.Image.Output(display_name="restored_faces", tooltip="each restored face, aligned, 512x512"),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelHandle,
        image: torch.Tensor,
        strength: float,
        threshold: float,
        batch_size: int,
        margin: float = DEFAULT_MARGIN,
        faces: FacesWire | None = None,
        identities: list | None = None,
        mode: str = Mode.AUTO.value,
        temporal: bool = False,
        frame_rate: float = 25.0,
        keep_colours: bool = True,
    ) -> io.NodeOutput:
        pictures = _pictures(image, "DMDNet Restore Faces")
        if temporal and faces is not None:
            raise ValueError(
                "DMDNet Restore Faces: with temporal on, faces are tracked here; disconnect the faces input"
            )
        if faces is not None and len(faces.detections) != len(pictures):
            raise ValueError(
                f"DMDNet Restore Faces: the faces input was detected on {len(faces.detections)} images, "
                f"this batch has {len(pictures)}"
            )
        frames, restored, seen = torch.empty_like(image, dtype=torch.float32, device="cpu"), [], 0
        with _OnDevice(model) as loaded:
            restorer = load_restorer(
                loaded, identities=identities or (), threshold=threshold, margin=margin, batch_size=batch_size
            )
            found = faces.detections if faces is not None else None
            if not temporal and faces is None:  # found up front, so that the progress bar knows the faces
                found = restorer.helper.find(pictures)
            clip = restore_clip(
                restorer,
                lambda: iter(pictures),
                mode,
                strength=strength,
                temporal=temporal,
                rate=frame_rate,
                keep_colours=keep_colours,
                detections=found,
                n_frames=len(pictures),
                progress=_progress(),
            )
            for i, result in enumerate(clip.results):
                frames[i] = torch.from_numpy(result.pixels).clamp_(0, 1)
                restored += [f.restored for f in result.faces if f.restored is not None]
                seen += len(result.faces)
        if not seen:
            log.warning("DMDNet Restore Faces: no face found, the image passes through unchanged")
        return io.NodeOutput(frames, _crops_image(restored))


NODES: list[type[io.ComfyNode]] = [
    DMDNetModelLoader,
    DMDNetDetectFaces,
    DMDNetBuildIdentity,
    DMDNetSaveIdentity,
    DMDNetLoadIdentity,
    DMDNetRestoreFaces,
]


class DMDNetExtension(ComfyExtension):
    """The pack as ComfyUI's V3 loader sees it: one-time set-up in ``on_load``, then the nodes."""

    ready = False

    async def on_load(self) -> None:
        """Model folders and example inputs, once. Newer ComfyUI calls this before ``get_node_list``;
        0.3.64 (our oldest) defines it but never calls it, so ``get_node_list`` makes sure."""
        if not self.ready:
            register_folders()
            install_example_inputs()
            self.ready = True

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        await self.on_load()
        return NODES


async def comfy_entrypoint() -> DMDNetExtension:
    return DMDNetExtension()
