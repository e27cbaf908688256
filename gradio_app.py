"""Gradio demo: upload a photo (or a short video) and a few good pictures of the same person.

    python gradio_app.py [--host 127.0.0.1] [--port 7860] [--weights PATH] [--device cpu|cuda] [--share]
                         [--mcp] [--identities DIR]

Glue around dmdnet_plugin's Restorer (the CLI's pipeline, built by the same factory). The
model loads once and is shared by all requests; the queue runs one restoration at a time.
With ``--mcp`` (or ``GRADIO_MCP_SERVER=True``) the app is also a Model Context Protocol server
whose tools (``restore_photo``, ``build_identity``, ``list_identities``) an agent can call; the
identities they save live in ``--identities DIR``.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

from dmdnet_plugin.factory import load_restorer
from dmdnet_plugin.identity import IdentityDictionary, IdentityError, identity_file
from dmdnet_plugin.io import ImageError, Picture, read_image, to_uint8, write_image
from dmdnet_plugin.matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from dmdnet_plugin.pipeline import Mode, Restorer
from dmdnet_plugin.video import restore_video
from dmdnet_plugin.weights import LoadedModel, WeightsError, cache_dir, load_model

ROOT = Path(__file__).resolve().parent
MAX_UPLOAD = "25mb"
MAX_VIDEO_FRAMES = 300  # about 10 s at 30 fps: a CPU restores a face in about a second
MODES = [m.value for m in Mode]


def photo_input(**kwargs) -> gr.Image:
    """``gr.Image`` whose unreadable uploads get a message naming the file: gradio's own is a
    paragraph about "input component at index 0". Wrapped per instance, because a subclass of a
    gradio component makes gradio write a ``.pyi`` file beside this one."""
    component = gr.Image(**kwargs)
    preprocess = component.preprocess

    def named_errors(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            name = getattr(payload, "orig_name", None) or "the photo"
            raise gr.Error(f"{name}: not a readable image ({type(exc).__name__})") from None

    component.preprocess = named_errors
    return component


def _readable(text: str, paths: list[str]) -> str:
    """A message without the server's temporary upload folders."""
    for path in paths:
        text = text.replace(path, Path(path).name)
    return text


def _display(pixels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """8-bit RGB for the browser, whatever the photo's depth or layout; optionally resized (w, h)."""
    rgb = Picture(pixels).rgb8()
    return rgb if size is None or size == rgb.shape[1::-1] else cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)


def _identity(restorer: Restorer, ref_paths: list[str], identity_path: str | None):
    """The identity to use (uploaded, or built from the references), its file, and notes."""
    if identity_path:
        return IdentityDictionary.load(identity_path), None, []
    if not ref_paths:
        return None, None, []
    ident, rejected = restorer.build_identity(ref_paths, name="person")
    out = Path(tempfile.mkdtemp(prefix="dmdnet_")) / "identity.safetensors"
    ident.save(out)
    return ident, str(out), [f"reference skipped: {_readable(r, ref_paths)}" for r in rejected]


@dataclass(frozen=True)
class Demo:
    """The app: the settings it was started with, and what its pages do. The model loads on first use
    and is shared by every request (and kept when it loaded; a failed load is tried again)."""

    weights: str | None = None
    device: str | None = None
    max_video_frames: int = MAX_VIDEO_FRAMES
    identities_dir: Path = field(default_factory=lambda: cache_dir() / "identities")  # the agents' tools

    @functools.cached_property
    def model(self) -> LoadedModel:
        return load_model(self.weights, device=self.device)

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
        progress=gr.Progress(),
    ):
        """Everything the page shows for one request; problems become one readable message."""
        if not photo:
            raise gr.Error("Upload a photo first.")
        ref_paths = list(ref_paths or [])
        try:
            restorer = load_restorer(self.model, threshold=threshold, margin=margin, only_largest=only_largest)
            picture = read_image(photo)
            progress(0.1, desc="identity dictionary")
            ident, ident_file, notes = _identity(restorer, ref_paths, identity_path)
            progress(0.3, desc="finding faces and restoring")
            generic, with_identity = restorer.compare(
                picture, mode, [ident] if ident else [], strength, upscale, keep_colours
            )
        except (WeightsError, ImageError, IdentityError, ValueError) as exc:
            raise gr.Error(_readable(str(exc), [photo, *ref_paths, identity_path or ""])) from None
        if not generic.faces:
            raise gr.Error("No face found in this photo.")
        shown = with_identity or generic
        out_file = (
            Path(tempfile.mkdtemp(prefix="dmdnet_")) / f"restored_{Path(photo).stem}{Path(photo).suffix or '.png'}"
        )
        write_image(out_file, shown.pixels, shown.alpha)
        after = _display(shown.pixels)
        restored = [f for f in shown.faces if f.restored is not None]
        matched = sum(f.identity is not None for f in restored)
        message = f"{len(restored)} face(s) restored" + (f", {matched} with the identity dictionary" if ident else "")
        message += "".join(
            f"; face {i + 1} left as it was ({f.left_as_is})" for i, f in enumerate(shown.faces) if f.left_as_is
        )
        message += "".join(f"\n\n{n}" for n in notes)
        message += "\n\n" + self.model.notice().replace("\n", "\n\n")
        return (
            (_display(picture.pixels, after.shape[1::-1]), after),
            _display(generic.pixels),
            _display(with_identity.pixels) if with_identity is not None else None,
            [(to_uint8(f.restored), f"face {i + 1}") for i, f in enumerate(restored)],
            str(out_file),
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
        try:
            restorer = load_restorer(self.model)
            ident, _, notes = _identity(restorer, ref_paths, identity_path)
            out_file = Path(tempfile.mkdtemp(prefix="dmdnet_")) / f"restored_{Path(video).stem}.mp4"
            report = restore_video(
                restorer,
                video,
                out_file,
                identities=[ident] if ident else [],
                temporal=temporal,
                max_frames=self.max_video_frames,
                progress=lambda status: progress(status.frames_done / max(status.n_frames, 1), desc=status.stage),
            )
        except (WeightsError, ImageError, IdentityError, ValueError) as exc:
            raise gr.Error(_readable(str(exc), [video, *ref_paths, identity_path or ""])) from None
        lines = [f"{report['frames']} frames at {report['fps']} fps, {report['faces_restored']} faces restored"]
        for track in report.get("tracks", []):
            who = track.get("identity") or "generic"
            lines.append(f"person {track['track'] + 1}: frames {track['frames'][0]}-{track['frames'][1]}, {who}")
        lines += notes + [self.model.notice()]
        return str(out_file), "\n\n".join(lines)

    # ------------------------------------------------------------ MCP tools (what an agent reads)
    def restore_photo(self, photo: str, identity: str | None = None, mode: str = "auto", strength: float = 1.0) -> str:
        """Restore every face in a photo with DMDNet (blind face restoration) and return the restored photo.

        The photo keeps its size and format; only the faces change. With a saved identity, faces of that
        person are restored with their own features (eyes, mouth) instead of generic ones.

        Args:
            photo: the photo to restore, as an http(s) URL or a data: URL of a JPEG, PNG or WebP image.
            identity: a saved identity's name (list_identities, build_identity); empty: generic restoration.
            mode: "auto" (matching faces get the identity), "generic", "identity" (all faces), "only-matched" (the rest stay as they were).
            strength: how much of the restored face is blended over the original, from 0.0 (none) to 1.0 (all).
        Returns:
            the restored photo
        """  # noqa: E501 (gradio reads one line per argument)
        try:
            identities = [IdentityDictionary.load(identity_file(self.identities_dir, identity))] if identity else []
            restorer = load_restorer(self.model)
            picture = read_image(photo)
            result = restorer.run([picture], mode, identities, float(strength))[0]
        except (WeightsError, ImageError, IdentityError, ValueError) as exc:
            raise gr.Error(_readable(str(exc), [photo])) from None
        if not result.faces:
            raise gr.Error(f"{Path(photo).name}: no face found in this photo")
        out = Path(tempfile.mkdtemp(prefix="dmdnet_")) / f"restored_{Path(photo).stem}{Path(photo).suffix or '.png'}"
        write_image(out, result.pixels, result.alpha)
        return str(out)

    def build_identity(
        self,
        name: str,
        photo: str,
        photo_2: str | None = None,
        photo_3: str | None = None,
        photo_4: str | None = None,
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
        Returns:
            what was saved, and which photos were rejected
        """
        photos = [p for p in (photo, photo_2, photo_3, photo_4) if p]
        try:
            target = identity_file(self.identities_dir, name)
            ident, rejected = load_restorer(self.model).build_identity(photos, name=target.stem)
            target.parent.mkdir(parents=True, exist_ok=True)
            ident.save(target)
        except (WeightsError, ImageError, IdentityError, ValueError) as exc:
            raise gr.Error(_readable(str(exc), photos)) from None
        notes = "".join(f"; rejected {_readable(r, photos)}" for r in rejected)
        return f"saved identity {target.stem!r} from {ident.n_refs} photo(s){notes}"

    def list_identities(self) -> str:
        """List the saved identity dictionaries that restore_photo can use.

        Returns:
            the names, one per line (none yet: an empty text)
        """
        return "\n".join(sorted(p.stem for p in self.identities_dir.glob("*.safetensors")))


def mcp_tools(demo: Demo) -> None:
    """The agents' endpoints, with components of their own (not shown on the page): gradio turns each
    into an MCP tool from the method's name, type hints and docstring."""
    with gr.Row(visible=False):
        photos = [gr.File(type="filepath") for _ in range(4)]
        identity, name = gr.Textbox(value=""), gr.Textbox()
        mode, strength = gr.Dropdown(MODES, value="auto"), gr.Number(1.0, minimum=0, maximum=1)
        restored, text = gr.File(), gr.Textbox()
        for fn, inputs, output in (
            (demo.restore_photo, [photos[0], identity, mode, strength], restored),
            (demo.build_identity, [name, *photos], text),
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
    with gr.Blocks(title="DMDNet face restoration") as blocks:
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
                    with gr.Row():
                        largest = gr.Checkbox(False, label="Only the largest face")
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
                [photo, references, identity, mode, upscale, strength, largest, threshold, margin, colours],
                [slider, generic, with_identity, gallery, result_file, identity_file, status],
                api_name="restore",
                api_visibility="undocumented",  # callable by gradio_client; agents get the MCP tools instead
            )
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


def main() -> None:
    parser = argparse.ArgumentParser(description="DMDNet Gradio demo")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--weights", help="checkpoint; default: the discovery order of docs/weights.md")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument(
        "--mcp", action="store_true", help="also serve MCP tools at /gradio_api/mcp/ (needs the mcp extra)"
    )
    parser.add_argument(
        "--identities", help=f"folder of the identities the MCP tools save (default {cache_dir()}/identities)"
    )
    args = parser.parse_args()
    demo = (
        Demo(args.weights, args.device)
        if not args.identities
        else Demo(args.weights, args.device, identities_dir=Path(args.identities))
    )
    blocks = build_ui(demo)
    blocks.queue(default_concurrency_limit=1, max_size=16)
    blocks.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=MAX_UPLOAD,
        show_error=True,
        allowed_paths=[str(ROOT / "examples")],
        mcp_server=True if args.mcp else None,  # None: gradio reads GRADIO_MCP_SERVER
    )


if __name__ == "__main__":
    main()
