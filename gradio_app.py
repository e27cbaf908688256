"""Gradio demo: upload a photo (or a short video) and a few good pictures of the same person.

    python gradio_app.py [--host 127.0.0.1] [--port 7860] [--weights PATH] [--device cpu|cuda]
                         [--precision auto|fp32|fp16|bf16] [--detector auto|hog|cnn|retinaface]
                         [--face-models DIR] [--share] [--mcp] [--identities DIR]
                         [--bg-upsampler MODEL ...]

Glue around dmdnet_plugin's Restorer (the CLI's pipeline, built by the same factory). The
model loads once and is shared by all requests; the queue runs one restoration at a time.
With ``--mcp`` (or ``GRADIO_MCP_SERVER=True``) the app is also a Model Context Protocol server
whose tools (``restore_photo``, ``build_identity``, ``list_identities``) an agent can call; the
identities they save live in ``--identities DIR``. Each ``--bg-upsampler`` (a super-resolution model file,
or a folder of them) is a choice of the photo page's *Background*: the rest of the photo upscaled by that
model instead of a Lanczos resize (docs/background.md).

Whatever a browser or an agent sends is untrusted: errors come back as one line that names files,
never the server's folders; results live in one temporary folder that goes when the server stops.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
from PIL import Image

from dmdnet_plugin.background import UpsamplerError, load_upsampler
from dmdnet_plugin.face_helper import MIN_FACE
from dmdnet_plugin.faces import DETECTORS, FaceModelsError
from dmdnet_plugin.factory import load_restorer
from dmdnet_plugin.identity import IdentityDictionary, IdentityError, identity_file
from dmdnet_plugin.io import MAX_PIXELS, Picture, check_pixels, read_image, to_uint8, write_image
from dmdnet_plugin.matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from dmdnet_plugin.pipeline import ImageResult, Mode, Restorer
from dmdnet_plugin.runtime import PRECISIONS
from dmdnet_plugin.text import printable
from dmdnet_plugin.video import restore_video
from dmdnet_plugin.weights import LoadedModel, WeightsError, cache_dir, load_model

ROOT = Path(__file__).resolve().parent
MAX_UPLOAD = "25mb"
MAX_VIDEO_FRAMES = 300  # about 10 s at 30 fps: a CPU restores a face in about a second
MODES = [m.value for m in Mode]
LANCZOS = "Lanczos"  # the Background choice without a model: a plain resize
MODEL_SUFFIXES = (".pth", ".safetensors")  # what a --bg-upsampler folder offers
KEEP_RESULTS_S = 600  # a result stays this long in the app's folder (gradio copies it to its cache when sent)
CACHE_LIFE_S = (600, 3600)  # gradio's cache: every 10 minutes, files older than an hour go (all of them at exit)
# What a user can act on (ImageError and IdentityError are ValueErrors); anything else is a bug: gradio says "Error".
REFUSED = (WeightsError, FaceModelsError, ValueError, OSError)
_FOLDERS = re.compile(r"(?<![\w.~:/-])(?:/[^\s/'\"]+)+/")  # the folders of an absolute path, up to its last slash


def photo_input(**kwargs) -> gr.Image:
    """``gr.Image`` whose unreadable uploads get a message naming the file: gradio's own is a
    paragraph about "input component at index 0". Wrapped per instance, because a subclass of a
    gradio component makes gradio write a ``.pyi`` file beside this one."""
    component = gr.Image(**kwargs)
    preprocess = component.preprocess

    def named_errors(payload):
        name = printable(getattr(payload, "orig_name", None) or "the photo")
        try:
            return preprocess(payload)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):  # the warning: an error (main)
            raise gr.Error(f"{name}: image is larger than the limit of {MAX_PIXELS} pixels") from None
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise gr.Error(f"{name}: not a readable image ({type(exc).__name__})") from None

    component.preprocess = named_errors
    return component


def names_only(text: str, paths: Iterable[str | Path | None]) -> str:
    """``text`` as a browser or an agent may see it: each of ``paths`` (files or folders of the server)
    and any other absolute path shown by its name alone, control characters escaped."""
    for path in sorted({str(p) for p in paths if p}, key=len, reverse=True):
        text = text.replace(path.rstrip(os.sep) + os.sep, "").replace(path, Path(path).name)
    return printable(_FOLDERS.sub("", text))


def no_face(photo: str, result: ImageResult) -> gr.Error:
    """Nothing to restore: no face found, or why the faces found were left out (too small...)."""
    reasons = "; ".join(skipped["reason"] for skipped in result.skipped) or "no face found in this photo"
    return gr.Error(f"{printable(Path(photo).name)}: {reasons}")


def check_upscale(picture: Picture, upscale: float, photo: str) -> None:
    """An upscaled result is held whole in memory: it obeys the photos' pixel limit."""
    width, height = picture.size
    check_pixels(round(width * upscale), round(height * upscale), f"{Path(photo).name} upscaled {upscale:g}x")


def _display(pixels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """8-bit RGB for the browser, whatever the photo's depth or layout; optionally resized (w, h)."""
    rgb = Picture(pixels).rgb8()
    return rgb if size is None or size == rgb.shape[1::-1] else cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)


def scratch_folder() -> str:
    """An app's folder for its results and built dictionaries, removed when the process exits (not with
    the app: a caller may read a result after dropping the app that made it)."""
    folder = tempfile.mkdtemp(prefix="dmdnet_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class Demo:
    """The app: the settings it was started with, and what its pages do. The model loads on first use
    and is shared by every request (and kept when it loaded; a failed load is tried again)."""

    weights: str | None = None
    device: str | None = None
    precision: str = "auto"  # fp32: the same pixels on every machine (auto may pick bf16 on a CPU)
    detector: str = "auto"
    face_models: str | None = None
    max_video_frames: int = MAX_VIDEO_FRAMES
    identities_dir: Path = field(default_factory=lambda: cache_dir() / "identities")  # the agents' tools
    keep_results_s: float = KEEP_RESULTS_S
    upsamplers: tuple[str, ...] = ()  # the Background choices besides Lanczos: model files (background_models)
    scratch: str = field(init=False, repr=False, compare=False, default_factory=scratch_folder)

    @functools.cached_property
    def model(self) -> LoadedModel:
        return load_model(self.weights, device=self.device, precision=self.precision)

    def _restorer(self, **options) -> Restorer:
        return load_restorer(self.model, detector=self.detector, face_models=self.face_models, **options)

    def _public(self, text: str, *uploads: str | None) -> str:
        """``text`` without the server's paths: the uploads and the app's own files by name only."""
        weights = self.weights and Path(self.weights).expanduser()
        folders = (self.scratch, self.identities_dir, os.path.realpath(self.identities_dir), cache_dir())
        return names_only(text, [*uploads, weights, *self.upsamplers, *folders])

    def backgrounds(self) -> list[str]:
        """The Background choices: Lanczos, then each model by its file name."""
        return [LANCZOS, *(Path(p).name for p in self.upsamplers)]

    def _model_file(self, background: str | None) -> str | None:
        """The model file of a Background choice (None: Lanczos)."""
        if not background or background == LANCZOS:
            return None
        paths = {Path(p).name: p for p in self.upsamplers}
        if background not in paths:
            raise ValueError(f"no background {printable(background)!r}: one of {', '.join(self.backgrounds())}")
        return paths[background]

    def upscale_for(self, background: str | None):
        """The Upscale slider when a Background model is chosen: the model's own scale (loaded on the CPU
        at the start, so the face model need not load for this); Lanczos leaves it as it is."""
        with self._refusals():
            file = self._model_file(background)
            return gr.skip() if file is None else float(load_upsampler(file).scale)

    @contextlib.contextmanager
    def _refusals(self, *uploads: str | None) -> Iterator[None]:
        """A problem the user can act on (a bad file, the weights, an identity, a full disk) becomes one
        line on the page or in the agent's tool result."""
        try:
            yield
        except gr.Error:  # a ValueError too, and already for the user
            raise
        except REFUSED as exc:
            raise gr.Error(self._public(str(exc), *uploads)) from None

    def _result_path(self, name: str) -> Path:
        """A new file called ``name`` in the app's folder; first the results older than ``keep_results_s``
        go (gradio has copied them into its own cache by then)."""
        root = Path(self.scratch)
        cutoff = time.time() - self.keep_results_s
        for old in root.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another request removed it first
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=root)) / name

    def _save_result(self, photo: str, result: ImageResult) -> str:
        """The restored photo as a file of the photo's format, named after it."""
        name = f"restored_{Path(photo).stem}{Path(photo).suffix or '.png'}"
        return str(write_image(self._result_path(name), result.pixels, result.alpha))

    def _notice(self) -> list[str]:
        """The weights line(s) a result page shows: the file by its name."""
        return [self._public(line) for line in self.model.notice().splitlines()]

    def _identity(self, restorer: Restorer, ref_paths: list[str], identity_path: str | None):
        """The identity to use (uploaded, or built from the references), its file, and notes."""
        if identity_path:
            return IdentityDictionary.load(identity_path), None, []
        if not ref_paths:
            return None, None, []
        ident, rejected = restorer.build_identity(ref_paths, name="person")
        out = ident.save(self._result_path("identity.safetensors"))
        return ident, str(out), [f"reference skipped: {self._public(r, *ref_paths)}" for r in rejected]

    def _saved_identity(self, name: str) -> IdentityDictionary:
        """An identity the tools saved: a regular file in the identities folder (no link out of it)."""
        path = identity_file(self.identities_dir, name)
        if not path.is_file():
            raise IdentityError(f"no saved identity {path.stem!r}: list_identities gives the names")
        return IdentityDictionary.load(path)

    def restore(
        self,
        photo: str | None,
        ref_paths: list[str] | None,
        identity_path: str | None,
        mode: str,
        upscale: float,
        strength: float,
        only_largest: bool,
        threshold: float = DEFAULT_THRESHOLD,
        margin: float = DEFAULT_MARGIN,
        keep_colours: bool = True,
        min_face: int = MIN_FACE,
        background: str = LANCZOS,
        progress=gr.Progress(),
    ):
        """Everything the page shows for one request; problems become one readable message.
        ``background``: Lanczos or a model of :meth:`backgrounds` for the rest of the photo."""
        if not photo:
            raise gr.Error("Upload a photo first.")
        ref_paths = list(ref_paths or [])
        with self._refusals(photo, *ref_paths, identity_path):
            restorer = self._restorer(threshold=threshold, margin=margin, only_largest=only_largest, min_face=min_face)
            picture = read_image(photo)
            check_upscale(picture, upscale, photo)
            file = self._model_file(background)
            upsampler = None if file is None else load_upsampler(file, self.model.device)
            progress(0.1, desc="identity dictionary")
            ident, ident_file, notes = self._identity(restorer, ref_paths, identity_path)
            progress(0.3, desc="finding faces and restoring")
            generic, with_identity = restorer.compare(
                picture, mode, [ident] if ident else [], strength, upscale, keep_colours, upsampler
            )
        if not generic.faces:
            raise no_face(photo, generic)
        shown = with_identity or generic
        with self._refusals(photo):
            out_file = self._save_result(photo, shown)
        after = _display(shown.pixels)
        restored = [f for f in shown.faces if f.restored is not None]
        matched = sum(f.identity is not None for f in restored)
        message = f"{len(restored)} face(s) restored" + (f", {matched} with the identity dictionary" if ident else "")
        message += "".join(
            f"; face {i + 1} left as it was ({f.left_as_is})" for i, f in enumerate(shown.faces) if f.left_as_is
        )
        if upsampler is not None:
            resized = "" if upscale == upsampler.scale else f", then resized to {upscale:g}x"
            notes.append(f"background: {printable(upsampler.name)} ({upsampler.scale}x){resized}")
        message = "\n\n".join([message, *notes, *self._notice()])
        return (
            (_display(picture.pixels, after.shape[1::-1]), after),
            _display(generic.pixels),
            _display(with_identity.pixels) if with_identity is not None else None,
            [(to_uint8(f.restored), f"face {i + 1}") for i, f in enumerate(restored)],
            out_file,
            ident_file,
            message,
        )

    def restore_clip(
        self,
        video: str | None,
        ref_paths: list[str] | None,
        identity_path: str | None,
        temporal: bool,
        progress=gr.Progress(),
    ):
        """The restored video (always MP4, which browsers play) and a line per track."""
        if not video:
            raise gr.Error("Upload a video first.")
        ref_paths = list(ref_paths or [])
        with self._refusals(video, *ref_paths, identity_path):
            restorer = self._restorer()
            ident, _, notes = self._identity(restorer, ref_paths, identity_path)
            out_file = self._result_path(f"restored_{Path(video).stem}.mp4")
            record = restore_video(
                restorer,
                video,
                out_file,
                identities=[ident] if ident else [],
                temporal=temporal,
                max_frames=self.max_video_frames,
                progress=lambda status: progress(status.frames_done / max(status.n_frames, 1), desc=status.stage),
            )
        lines = [f"{record.frames} frames at {record.fps} fps, {record.faces_restored} faces restored"]
        for track in record.tracks:
            who = printable(track.get("identity") or "generic")  # an uploaded dictionary's name: any text
            lines.append(f"person {track['track'] + 1}: frames {track['frames'][0]}-{track['frames'][1]}, {who}")
        lines += notes + self._notice()
        return str(out_file), "\n\n".join(lines)

    # ------------------------------------------------------------ MCP tools (what an agent reads)
    def restore_photo(
        self, photo: str, identity: str | None = None, mode: str = "auto", strength: float = 1.0, upscale: float = 1.0
    ) -> str:
        """Restore every face in a photo with DMDNet (blind face restoration) and return the restored photo.

        The photo keeps its format, and its size unless upscaled; only the faces change. With a saved identity,
        faces of that person are restored with their own features (eyes, mouth) instead of generic ones.

        Args:
            photo: the photo to restore, as an http(s) URL or a data: URL of a JPEG, PNG or WebP image.
            identity: a saved identity's name (list_identities, build_identity); empty: generic restoration.
            mode: "auto" (matching faces get the identity), "generic", "identity" (all faces), "only-matched" (the rest stay as they were).
            strength: how much of the restored face is blended over the original, from 0.0 (none) to 1.0 (all).
            upscale: resize the whole photo by this factor, from 1.0 (same size) to 4.0.
        Returns:
            the restored photo
        """  # noqa: E501 (gradio reads one line per argument)
        with self._refusals(photo):
            identities = [self._saved_identity(identity)] if identity else []
            picture = read_image(photo)
            check_upscale(picture, upscale, photo)
            result = self._restorer().run([picture], mode, identities, float(strength), float(upscale))[0]
        if not result.faces:
            raise no_face(photo, result)
        with self._refusals(photo):
            return self._save_result(photo, result)

    def build_identity(
        self,
        name: str,
        photo: str,
        photo_2: str | None = None,
        photo_3: str | None = None,
        photo_4: str | None = None,
        replace: bool = False,
    ) -> str:
        """Build and save a person's identity dictionary from one to four good photos of that one person.

        The largest face of each photo is used; one photo is enough, more give more of the person's details.
        restore_photo then takes the name as its identity.

        Args:
            name: the name to save it under: letters, digits, space, '_', '-' and '.' (e.g. "grandma").
            photo: a good, sharp photo of the person, as an http(s) URL or a data: URL of an image.
            photo_2: optionally, another photo of the same person.
            photo_3: optionally, another photo of the same person.
            photo_4: optionally, another photo of the same person.
            replace: true to replace an identity already saved under this name; false (default): that is an error.
        Returns:
            what was saved, and which photos were rejected
        """
        photos = [p for p in (photo, photo_2, photo_3, photo_4) if p]
        with self._refusals(*photos):
            target = identity_file(self.identities_dir, name)
            if target.exists() and not replace:
                raise IdentityError(f"identity {target.stem!r} already exists; pass replace=true to replace it")
            ident, rejected = self._restorer().build_identity(photos, name=target.stem)
            target.parent.mkdir(parents=True, exist_ok=True)
            ident.save(target)
        notes = "".join(f"; rejected {self._public(r, *photos)}" for r in rejected)
        return f"saved identity {target.stem!r} from {ident.n_refs} photo(s){notes}"

    def list_identities(self) -> str:
        """List the saved identity dictionaries that restore_photo can use.

        Returns:
            the names, one per line (none yet: an empty text)
        """
        names = []
        for path in sorted(self.identities_dir.glob("*.safetensors")):
            with contextlib.suppress(IdentityError, OSError):  # broken, unreadable, a link out of the folder...
                self._saved_identity(path.stem)
                names.append(path.stem)
        return "\n".join(names)


def mcp_tools(demo: Demo) -> None:
    """The agents' endpoints, with components of their own (not shown on the page): gradio turns each
    into an MCP tool from the method's name, type hints and docstring."""
    with gr.Row(visible=False):
        photos = [gr.File(type="filepath") for _ in range(4)]
        identity, name = gr.Textbox(value=""), gr.Textbox()
        mode, strength = gr.Dropdown(MODES, value="auto"), gr.Number(1.0, minimum=0, maximum=1)
        upscale, replace = gr.Number(1.0, minimum=1, maximum=4), gr.Checkbox(False)
        restored, text = gr.File(), gr.Textbox()
        for fn, inputs, output in (
            (demo.restore_photo, [photos[0], identity, mode, strength, upscale], restored),
            (demo.build_identity, [name, *photos, replace], text),
            (demo.list_identities, [], text),
        ):
            gr.Button().click(fn, inputs, output, api_name=fn.__name__)


def video_tab(demo: Demo, example: Path, refs: list[str]) -> None:
    """Short clips: faces tracked through the frames, one identity per person."""
    with gr.Row():
        with gr.Column():
            video = gr.Video(label=f"Video (at most {demo.max_video_frames} frames)", sources=["upload"])
            references = gr.File(file_count="multiple", file_types=["image"], label="Reference photos of the person")
            identity = gr.File(file_types=[".safetensors"], label="…or an identity dictionary (.safetensors)")
            temporal = gr.Checkbox(
                True,
                label="Temporal: track faces and smooth them over time",
                info="off: every frame restored on its own, as a photo",
            )
            run = gr.Button("Restore video", variant="primary")
        with gr.Column():
            result = gr.Video(label="Restored", interactive=False)
            status = gr.Markdown()
    run.click(
        demo.restore_clip,
        [video, references, identity, temporal],
        [result, status],
        api_name="restore_video",
        api_visibility="undocumented",  # callable by gradio_client; agents get the MCP tools instead
    )
    gr.Examples([[str(example), refs, None, True]], [video, references, identity, temporal])


def build_ui(demo: Demo) -> gr.Blocks:
    examples = ROOT / "examples"
    refs = sorted(str(p) for p in (examples / "refs" / "obama").glob("*.jpg"))
    with gr.Blocks(title="DMDNet face restoration", delete_cache=CACHE_LIFE_S) as blocks:
        gr.Markdown(
            "# DMDNet face restoration\nUpload a photo, and optionally a few good photos of the same person "
            "(or a saved identity dictionary) to keep that person's own features."
        )
        with gr.Tab("Photo"):
            with gr.Row():
                with gr.Column():
                    photo = photo_input(type="filepath", label="Photo (whole or an aligned face)")
                    references = gr.File(
                        file_count="multiple", file_types=["image"], label="Reference photos of the person"
                    )
                    identity = gr.File(file_types=[".safetensors"], label="…or an identity dictionary (.safetensors)")
                    mode = gr.Radio(
                        MODES,
                        value="auto",
                        label="Mode",
                        info="auto: faces that match the person are restored with their identity, the rest "
                        "generically; identity: every face with it; only-matched: the rest stay as they are",
                    )
                    with gr.Row():
                        upscale = gr.Slider(1, 4, value=1, step=0.5, label="Upscale")
                        strength = gr.Slider(0, 1, value=1, step=0.05, label="Blend strength")
                    background = None  # offered when the server has models: /restore then takes a 12th value
                    if demo.upsamplers:
                        background = gr.Dropdown(
                            demo.backgrounds(),
                            value=LANCZOS,
                            label="Background",
                            info="the rest of the photo: a Lanczos resize, or a super-resolution model (sets "
                            "Upscale to its scale); the faces are restored at the upscaled size",
                        )
                    with gr.Row():
                        largest = gr.Checkbox(False, label="Only the largest face")
                        min_face = gr.Slider(
                            8,
                            128,
                            value=MIN_FACE,
                            step=1,
                            label="Smallest face (px)",
                            info="narrower faces stay as they are",
                        )
                        colours = gr.Checkbox(
                            True,
                            label="Keep colours",
                            info="the photo's broad colours; off: the model's, which may drift",
                        )
                    with gr.Accordion("Identity matching", open=False):
                        threshold = gr.Slider(
                            0.3,
                            0.7,
                            value=DEFAULT_THRESHOLD,
                            step=0.01,
                            label="Threshold",
                            info="largest embedding distance that can be the same person",
                        )
                        margin = gr.Slider(
                            0,
                            0.2,
                            value=DEFAULT_MARGIN,
                            step=0.01,
                            label="Margin",
                            info="the nearest person must be this much nearer than the next, or the face "
                            "stays unmatched (generic)",
                        )
                    run = gr.Button("Restore", variant="primary")
                with gr.Column():
                    slider = gr.ImageSlider(label="Before / after")
                    with gr.Row():
                        generic = gr.Image(label="Generic", interactive=False)
                        with_identity = gr.Image(label="With the identity", interactive=False)
                    gallery = gr.Gallery(label="Restored faces", columns=4, height=220)
                    with gr.Row():
                        result_file = gr.File(label="Full-resolution result")
                        identity_file = gr.File(label="Identity dictionary (reuse it later)")
                    status = gr.Markdown()
            run.click(
                demo.restore,
                [photo, references, identity, mode, upscale, strength, largest, threshold, margin, colours, min_face]
                + ([background] if background else []),
                [slider, generic, with_identity, gallery, result_file, identity_file, status],
                api_name="restore",
                api_visibility="undocumented",  # callable by gradio_client; agents get the MCP tools instead
            )
            if background:
                background.change(demo.upscale_for, background, upscale, api_visibility="private", queue=False)
            gr.Examples(
                [
                    [str(examples / "photos" / "obama_lowres.jpg"), refs, None, "auto", 2, 1.0, False],
                    [str(examples / "photos" / "family.jpg"), None, None, "generic", 1, 1.0, False],
                ],
                [photo, references, identity, mode, upscale, strength, largest],
            )
        with gr.Tab("Video"):
            video_tab(demo, examples / "video" / "obama_jitter.mp4", refs)
        mcp_tools(demo)
    return blocks


def _stop(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: gradio closes the server and empties its cache, and the app's folder goes at exit."""
    raise KeyboardInterrupt


def background_models(given: Iterable[str | Path]) -> tuple[str, ...]:
    """The model files of ``--bg-upsampler`` (files, and the .pth and .safetensors files of folders), each
    loaded once here so that a bad one stops the server at its start; the names must differ (the page
    shows names only)."""
    files = []
    for path in map(Path, given):
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES) if path.is_dir() else [path]
        if not found:
            raise UpsamplerError(f"{printable(path)}: no {' or '.join(MODEL_SUFFIXES)} files in this folder")
        files += [str(p.resolve()) for p in found if str(p.resolve()) not in files]
    for file in files:
        load_upsampler(file)
    names = [Path(f).name for f in files]
    if len(set(names)) < len(names):
        twice = sorted({printable(n) for n in names if names.count(n) > 1})
        raise UpsamplerError(f"two background models named {', '.join(twice)}: rename one")
    return tuple(files)


def main() -> None:
    parser = argparse.ArgumentParser(description="DMDNet Gradio demo")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--weights", help="checkpoint; default: the discovery order of docs/weights.md")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="compute precision, as the CLI's (default auto; fp32: the same pixels on every machine)",
    )
    parser.add_argument(
        "--detector",
        default="auto",
        choices=list(DETECTORS),
        help=f"face detector, as the CLI's (auto: {DETECTORS['auto']})",
    )
    parser.add_argument("--face-models", help="folder with facexlib RetinaFace weights (or $DMDNET_FACEXLIB_DIR)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument(
        "--mcp", action="store_true", help="also serve MCP tools at /gradio_api/mcp/ (needs the mcp extra)"
    )
    parser.add_argument(
        "--identities",
        type=Path,
        default=cache_dir() / "identities",
        help="folder of the identities the MCP tools save (default %(default)s)",
    )
    parser.add_argument(
        "--bg-upsampler",
        action="append",
        default=[],
        metavar="MODEL",
        help="a super-resolution model file (or a folder of .pth/.safetensors) offered as the photo page's "
        "Background; repeatable (docs/background.md)",
    )
    args = parser.parse_args()
    try:
        upsamplers = background_models(args.bg_upsampler)
    except UpsamplerError as exc:
        parser.exit(2, f"error: {exc}\n")
    # gr.Image opens uploads with Pillow, whose pixel limit only warns up to twice its value: in this
    # process (not in the core, which also runs inside ComfyUI) it is the photos' limit, and an error
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    signal.signal(signal.SIGTERM, _stop)
    demo = Demo(
        args.weights,
        args.device,
        args.precision,
        args.detector,
        args.face_models,
        identities_dir=args.identities,
        upsamplers=upsamplers,
    )
    blocks = build_ui(demo)
    blocks.queue(default_concurrency_limit=1, max_size=16)
    blocks.launch(  # without show_error: an unexpected exception's text (maybe a path) is shown as "Error"
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(ROOT / "examples")],
        mcp_server=True if args.mcp else None,  # None: gradio reads GRADIO_MCP_SERVER
    )


if __name__ == "__main__":
    main()
