"""``dmdnet``: restore photos, build and inspect identity dictionaries, convert checkpoints.

Errors about one input are one line on stderr naming the file; the batch goes on and the
exit status is 1 if any input failed. No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from .clips import ClipStatus
from .cluster import ClusterError, RayEngine, RayPlan
from .face_helper import MIN_FACE, FaceHelper
from .faces import DETECTORS, Face, FaceBackend, FaceModelsError, landmark_path, shared_backend, write_landmarks
from .factory import load_restorer
from .identity import IdentityDictionary
from .io import ImageError, Picture, list_images, read_image, refuse_overwrite, to_uint8, write_image
from .journal import JournalError, RunLockedError, same_name
from .matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD
from .pipeline import Mode, Restorer
from .report import Entry, Status
from .runs import LocalEngine, RunStart, restore_files
from .runtime import PRECISIONS
from .settings import RunSettings
from .text import printable
from .userfiles import BrokenLink, write_target
from .weights import OFFICIAL_URL, URL_ENV, WeightsError, cache_dir, convert, download_official, find_weights


class CliError(Exception):
    """A problem that stops the whole command (not one input)."""


# what stops a command with one line and exit status 2 (ValueError: a value no run can use)
COMMAND_ERRORS = (CliError, ValueError, WeightsError, FaceModelsError, RunLockedError, JournalError, ClusterError)


def _error(message: str) -> None:
    """One line, whatever the message holds (a file name may hold a newline)."""
    tqdm.write(f"error: {printable(message)}", file=sys.stderr)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="checkpoint (.pth or .safetensors); default: see docs/weights.md")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="compute precision (default auto: fp16 on CUDA; on CPU bf16 where native and measured faster, else fp32)",
    )
    _detector_args(p)


def _detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detector", default="auto", choices=list(DETECTORS), help="; ".join(f"{k}: {v}" for k, v in DETECTORS.items())
    )
    p.add_argument("--face-models", help="folder with facexlib RetinaFace weights (or $DMDNET_FACEXLIB_DIR)")


def _restorer(args) -> Restorer:
    """The restorer of the model options (identity build), saying which weights it runs."""
    restorer = load_restorer(args.weights, args.device, args.precision, args.detector, args.face_models)
    tqdm.write(restorer.loaded.notice(), file=sys.stderr)
    return restorer


def run_settings(args) -> RunSettings:
    """``restore``'s options as the run's one settings record (every option of the record is one of
    ``restore``'s: a new one without its option fails here at once)."""
    options = {name: getattr(args, name) for name in RunSettings.options()}
    return RunSettings.create(
        args.weights,
        args.device,
        args.precision,
        args.identity,
        args.mode,
        args.detector,
        args.face_models,
        args.bg_upsampler,
        **options,
    )


def cmd_restore(args) -> int:
    settings = run_settings(args)  # every option checked before the model loads
    progress = _Progress()
    if args.ray:
        engine = _ray_engine(args, settings)
        tqdm.write(settings.weights.source.notice(), file=sys.stderr)
    else:
        engine = LocalEngine(settings, args.workers, clip_progress=progress.clip)
        tqdm.write(engine.restorer.loaded.notice(), file=sys.stderr)
    with progress:
        report = restore_files(
            args.inputs,
            args.output,
            engine=engine,
            resume=args.resume,
            report=args.report,
            on_start=progress.start,
            on_entry=progress.entry,
        )
    for warning in report.warnings:
        tqdm.write(f"warning: {printable(warning)}", file=sys.stderr)
    counts = {s: report.count(s) for s in Status}
    earlier = f" ({progress.kept} by an earlier run)" if progress.kept else ""
    unchanged = f", {counts[Status.UNCHANGED]} left as they were" if counts[Status.UNCHANGED] else ""
    print(
        f"{counts[Status.OK]} restored{earlier}, {counts[Status.NO_FACE]} without a face{unchanged}, "
        f"{counts[Status.ERROR]} failed -> {printable(args.output)}",
        file=sys.stderr,
    )
    return 1 if report.failed else 0


def _ray_engine(args, settings: RunSettings) -> RayEngine:
    """``restore --ray``: the photos restored by Ray Data operators (:mod:`cluster`)."""
    try:
        import ray.data  # noqa: F401  (the [ray] extra)
    except ImportError as exc:
        raise CliError(f'--ray needs Ray Data: pip install "dmdnet-plugin[ray]" ({exc})') from None
    return RayEngine(settings, args.ray_address, RayPlan(restore_actors=args.ray_actors), args.precision)


class _Progress:
    """What a run shows on the terminal: its first line, a bar over the inputs, a bar per video, and
    one ``error:`` line per failed input."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.clips: dict[str, tqdm] = {}
        self.kept = 0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in [self.bar, *self.clips.values()]:
            if bar is not None:
                bar.close()

    def start(self, found: RunStart) -> None:
        self.kept = found.kept
        for entry in found.refused:
            _error(entry.error)
        if found.kept or found.again:
            again = f" ({found.again} of them again: input changed or output gone)" if found.again else ""
            tqdm.write(
                f"{found.kept} of {found.inputs} inputs already restored by an earlier run; restoring the "
                f"rest{again} (--no-resume: all)",
                file=sys.stderr,
            )
        todo = found.inputs - found.kept - len(found.refused)
        self.bar = tqdm(total=todo, desc="restoring", unit="file", disable=todo < 2 or not sys.stderr.isatty())

    def entry(self, entry: Entry) -> None:
        if entry.error:
            _error(entry.error)
        self.bar.update()

    def clip(self, src: str, status: ClipStatus) -> None:
        name = printable(Path(src).name)
        bar = self.clips.setdefault(src, tqdm(desc=name, unit="frame", disable=not sys.stderr.isatty()))
        bar.set_description(f"{name}: {status.stage}")
        bar.total, bar.n = status.n_frames, status.frames_done
        bar.refresh()


def output_file(out: str | Path, suffix: str, inputs: Sequence[str | Path] = ()) -> Path:
    """Where a command that writes one file writes it. The name must end in its kind's suffix, so that a
    slip (a photo or the input given as OUT) replaces nothing; a folder, a FIFO or an input is refused;
    a link is written through (replacing the link would leave its target stale)."""
    shown = printable(out)
    if Path(out).suffix.lower() != suffix:
        raise CliError(f"{shown}: give the name of the {suffix} file to write (it must end in {suffix})")
    try:
        target = Path(write_target(out))
    except BrokenLink as exc:
        raise CliError(f"{shown}: {exc.strerror}") from None
    if target.suffix.lower() != suffix:
        raise CliError(f"{shown}: a link to {printable(target)}, which does not end in {suffix}; it is not replaced")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as exc:
        raise CliError(f"{shown}: cannot write it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise CliError(f"{shown}: is a folder; give the {suffix} file to write")
    if not stat.S_ISREG(mode):
        raise CliError(f"{shown}: not a regular file; give the {suffix} file to write")
    if same_name(str(target)) in {same_name(str(i)) for i in inputs}:
        raise CliError(f"{shown}: is an input of this command; it is not overwritten")
    return target


def cmd_identity_build(args) -> int:
    refs = list_images(args.refs)
    weights = find_weights(args.weights).path
    out = output_file(args.output, ".safetensors", [*refs, weights])  # --extend may be OUT: read before the write
    old = IdentityDictionary.load(args.extend) if args.extend else None
    ident, rejected = _restorer(args).build_identity(refs, name=args.name, aligned=args.aligned)
    for reason in rejected:
        _error(f"reference rejected: {reason}")
    if old is not None:
        ident = old.extend(ident)
    try:
        ident.save(out)
    except OSError as exc:
        raise CliError(f"{printable(args.output)}: cannot write it ({exc.strerror or exc})") from None
    print(
        f"{args.output}: identity {args.name or '(unnamed)'} from {ident.n_refs} references"
        f"{f', {len(rejected)} rejected' if rejected else ''}",
        file=sys.stderr,
    )
    return 0


def cmd_identity_show(args) -> int:
    for path in args.files:
        meta = IdentityDictionary.load(path).metadata()
        for key, what in (("embedding", "references"), ("embedding_damaged", "references under fixed damage")):
            if key in meta:
                meta[key] = f"{len(json.loads(meta[key]))}-d mean of {meta['n_embedded']} {what}"
        print(json.dumps({"file": str(path), **meta}, indent=2))
    return 0


def _for_each_image(items: Sequence[str], desc: str, work: Callable[[Path, Path], str]) -> Counter:
    """``work(image, the folder it was found in)`` on every image given or found in a given folder;
    it returns what it did. An unusable image is one line naming it, counted as "failed"."""
    done: Counter = Counter()
    jobs = [(src, Path(item)) for item in items for src in list_images([item])]
    for src, root in tqdm(jobs, desc=desc, unit="image", disable=not sys.stderr.isatty()):
        try:
            done[work(src, root)] += 1
        except ImageError as exc:
            done["failed"] += 1
            _error(str(exc))
        except OSError as exc:  # its output could not be written
            done["failed"] += 1
            _error(f"{src}: cannot write its output ({exc.strerror or type(exc).__name__})")
    return done


def folder_arg(value: str | None) -> Path | None:
    """A folder a command writes into: one that is a file is refused before any work."""
    if not value:
        return None
    for folder in (Path(value), *Path(value).parents):  # the first that exists must be a folder
        if os.path.lexists(folder):
            if not os.path.isdir(folder):
                raise CliError(f"{printable(value)}: {printable(folder)} is not a folder")
            break
    return Path(value)


def _largest_face(backend: FaceBackend, src: Path, picture: Picture) -> Face:
    faces = backend.detect(picture.rgb8())
    if not faces:
        raise ImageError(f"{src}: no face found")
    return faces[0]


def cmd_landmarks(args) -> int:
    """Cache 68-point landmarks beside training images (NAME.png.txt, the authors' format)."""
    lm_root = folder_arg(args.landmarks_root)
    backend = shared_backend(args.detector, args.face_models)

    def landmarks(src: Path, root: Path) -> str:
        target = landmark_path(src, root if root.is_dir() else src.parent, lm_root)
        if target.exists() and not args.overwrite:
            return "kept"
        write_landmarks(target, _largest_face(backend, src, read_image(src)).landmarks)
        return "written"

    done = _for_each_image(args.folders, "landmarks", landmarks)
    failed = f"{done['failed']} images failed (each named above)"
    print(f"{done['written']} landmark files written, {done['kept']} kept, {failed}", file=sys.stderr)
    return 1 if done["failed"] else 0


def cmd_crops(args) -> int:
    """Cut the largest face of each photo to an aligned 512x512 training crop with its landmarks,
    keeping subfolders (one per person for BasicSR's ``identities`` layout). A face that would be
    enlarged more than ``--max-upscale`` is left out: an enlarged face is a blurred target."""
    out, lm_root = folder_arg(args.output), folder_arg(args.landmarks_root)
    helper = FaceHelper(shared_backend(args.detector, args.face_models))

    def crop(src: Path, root: Path) -> str:
        target = out / (src.relative_to(root) if root.is_dir() else Path(src.name)).with_suffix(".png")
        refuse_overwrite(src, target)
        picture = read_image(src)
        face = helper.align(picture.rgb(), _largest_face(helper.backend, src, picture))
        if face.enlargement > args.max_upscale:
            _error(
                f"{src}: face left out, it would be enlarged {face.enlargement:.2f}x "
                f"(more than --max-upscale {args.max_upscale})"
            )
            return "small"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image(target, to_uint8(face.crop))
        write_landmarks(landmark_path(target, out, lm_root), face.crop_landmarks)
        return "written"

    done = _for_each_image(args.inputs, "crops", crop)
    print(
        f"{done['written']} crops written, {done['small']} faces too small, {done['failed']} images failed",
        file=sys.stderr,
    )
    return 1 if done["failed"] else 0


def cmd_weights_download(args) -> int:
    target = Path(args.to) / "DMDNet.pth" if args.to else None
    path = download_official(args.url, target)
    print(f"wrote {path}; it is now found before the bundled demo model", file=sys.stderr)
    return 0


def cmd_weights_which(args) -> int:
    source = find_weights(args.weights)
    print(json.dumps(source.record()))
    print(source.notice(), file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    try:
        convert(args.input, output_file(args.output, ".safetensors", [args.input]), half=args.half)
    except OSError as exc:
        raise CliError(f"{printable(args.output)}: cannot write it ({exc.strerror or exc})") from None
    print(f"wrote {printable(args.output)}", file=sys.stderr)
    return 0


def cmd_export_onnx(args) -> int:
    """The model, and an identity folded in, as an ONNX face enhancer (docs/onnx.md)."""
    try:
        from .onnx_export import export_onnx
    except ImportError as exc:
        raise CliError(f'export-onnx needs the onnx extra: pip install "dmdnet-plugin[onnx]" ({exc})') from None
    from .weights import load_model

    out = output_file(args.output, ".onnx")
    identity = IdentityDictionary.load(args.identity) if args.identity else None
    loaded = load_model(args.weights, device="cpu", precision="fp32")
    tqdm.write(loaded.notice(), file=sys.stderr)
    try:
        export_onnx(loaded.net, out, identity, boxes_input=args.boxes_input)
    except OSError as exc:
        raise CliError(f"{printable(out)}: cannot write it ({exc.strerror or exc})") from None
    what = f"identity {identity.name or '(unnamed)'}" if identity else "generic"
    boxes = "boxes input" if args.boxes_input else "template boxes"
    print(f"wrote {printable(out)} ({what}, {boxes}, {out.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmdnet", description="DMDNet blind face restoration with identity dictionaries"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("restore", help="restore every face of photos and videos")
    p.add_argument("inputs", nargs="+", help="image or video files, or folders")
    p.add_argument("-o", "--output", required=True, help="output folder (OUTDIR/<name of input>)")
    _model_args(p)
    p.add_argument("--identity", action="append", default=[], metavar="FILE", help="identity dictionary (repeatable)")
    p.add_argument(
        "--mode",
        default=Mode.AUTO.value,
        choices=[m.value for m in Mode],
        help="auto: faces matching an --identity use it, others generic; generic: ignore identities; "
        "identity: every face with the one --identity; only-matched: only the faces that match an "
        "--identity are restored, the others stay exactly as they were",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"largest embedding distance that matches an identity (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="the nearest identity must be this much nearer than the second-nearest, or the face stays "
        f"unmatched (default {DEFAULT_MARGIN}; 0: nearest wins)",
    )
    p.add_argument("--aligned", action="store_true", help="inputs are aligned 512x512 face crops")
    p.add_argument("--batch-size", type=int, default=4, help="faces per model call (default 4)")
    p.add_argument(
        "--upscale", type=float, help="resize the whole photo by this factor (default 1, or the --bg-upsampler's scale)"
    )
    p.add_argument(
        "--bg-upsampler",
        metavar="MODEL",
        help="a super-resolution model for the rest of the photo (Real-ESRGAN, SwinIR, HAT, ...: any spandrel "
        "loads; .pth or .safetensors), instead of a plain resize; see docs/cli.md",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="how much of the restored face is blended over the original, 0 to 1 (default 1: all)",
    )
    p.add_argument(
        "--min-face", type=int, default=MIN_FACE, help=f"skip faces narrower than this (default {MIN_FACE} px)"
    )
    p.add_argument("--only-largest", action="store_true", help="restore only the largest face of each photo")
    p.add_argument("--max-faces", type=int, help="restore at most this many faces of each photo, largest first")
    p.add_argument("--save-faces", action="store_true", help="also write cropped_faces/ and restored_faces/ (photos)")
    p.add_argument(
        "--keep-colours",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restored faces keep the photo's broad colours and take fine detail from the model (default); "
        "--no-keep-colours: the model's own colours",
    )
    p.add_argument(
        "--temporal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="videos: faces are tracked, steadily aligned and smoothed over time, one identity per track "
        "(default); --no-temporal: each frame restored on its own, as a photo",
    )
    p.add_argument("--report", help="write a JSON report to this file")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads that read, find faces and write around the model (default 2; 0: one stage after "
        "the other, the reference path)",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip the inputs an earlier run into the same folder with the same settings finished (its journal "
        "is in ~/.cache/dmdnet/runs; the default); --no-resume: restore every input again",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="restore the photos on a Ray cluster (--ray-address; default: $RAY_ADDRESS, the Ray this machine "
        "runs, else one started here for the run); inputs and -o may be s3:// or gs:// URIs; photos only "
        "(videos: without --ray). Needs the [ray] extra; see docs/scale.md",
    )
    p.add_argument("--ray-address", metavar="ADDRESS", help="with --ray: the cluster (host:port, ray://..., or auto)")
    p.add_argument(
        "--ray-actors", type=int, help="model actors on Ray (default: one per GPU of the cluster, or one on CPU)"
    )
    p.set_defaults(func=cmd_restore)

    ident = sub.add_parser("identity", help="identity dictionaries").add_subparsers(dest="action", required=True)
    p = ident.add_parser("build", help="build an identity dictionary from reference photos of one person")
    p.add_argument("refs", nargs="+", help="reference photos or folders (the largest face of each is used)")
    p.add_argument("-o", "--output", required=True, help="FILE.safetensors")
    p.add_argument("--name", help="the person's name, shown in reports")
    p.add_argument("--extend", metavar="FILE", help="add these references to an existing dictionary")
    p.add_argument("--aligned", action="store_true", help="references are aligned 512x512 crops")
    _model_args(p)
    p.set_defaults(func=cmd_identity_build)
    p = ident.add_parser("show", help="print the metadata of identity dictionaries")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_identity_show)

    p = sub.add_parser("landmarks", help="write NAME.png.txt 68-point landmarks beside training images")
    p.add_argument("folders", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--overwrite", action="store_true", help="recompute existing landmark files")
    p.add_argument("--landmarks-root", help="write under this folder, mirroring each input folder (for read-only data)")
    _detector_args(p)
    p.set_defaults(func=cmd_landmarks)

    p = sub.add_parser("crops", help="cut aligned 512x512 training crops with landmarks from photos")
    p.add_argument("inputs", nargs="+", help="photos or folders (searched recursively; subfolders are kept)")
    p.add_argument("-o", "--output", required=True, help="folder for NAME.png crops and NAME.png.txt landmarks")
    p.add_argument(
        "--max-upscale",
        type=float,
        default=1.3,
        help="leave out faces the crop would enlarge more than this (default 1.3)",
    )
    p.add_argument("--landmarks-root", help="write landmark files under this folder instead, mirroring the output")
    _detector_args(p)
    p.set_defaults(func=cmd_crops)

    weights = sub.add_parser("weights", help="find or fetch checkpoints").add_subparsers(dest="action", required=True)
    p = weights.add_parser("download", help="fetch the authors' DMDNet.pth into the cache (the only network use)")
    p.add_argument("--url", help=f"where to fetch it from (default: ${URL_ENV}, else {OFFICIAL_URL})")
    p.add_argument("--to", help=f"folder to write DMDNet.pth into (default: {cache_dir()})")
    p.set_defaults(func=cmd_weights_download)
    p = weights.add_parser("which", help="print the checkpoint that would be used, and why")
    p.add_argument("--weights", help="an explicit checkpoint, as restore takes it")
    p.set_defaults(func=cmd_weights_which)

    p = sub.add_parser("convert", help="convert a checkpoint to .safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--half", action="store_true", help="store float16 weights")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-onnx", help="write the model as an ONNX face enhancer (onnxruntime, face-swap tools)")
    p.add_argument("output", help="OUT.onnx")
    p.add_argument("--weights", help="checkpoint (.pth or .safetensors); default: see docs/weights.md")
    p.add_argument(
        "--identity", metavar="FILE", help="fold this identity dictionary in: the file restores with the person's atoms"
    )
    p.add_argument(
        "--boxes-input",
        action="store_true",
        help="a second input 'boxes' (N, 4, 4) takes landmark boxes (default: the FFHQ template's, one input)",
    )
    p.set_defaults(func=cmd_export_onnx)
    return parser


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, docker stop, CI) ends a command as Ctrl-C does: temporary files removed."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # where handlers can be set
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return args.func(args)
    except COMMAND_ERRORS as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    finally:
        if main_thread:  # main() called from Python (tests, notebooks) leaves the process as it was
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
