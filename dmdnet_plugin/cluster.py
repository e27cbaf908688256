"""Archives on a Ray cluster: the photo stream's stages as Ray Data operators.

read (tasks) -> detect (CPU actors holding the face backend) -> restore (actors holding the model:
one per GPU, or on CPU) -> paste (tasks) -> write (tasks). A row is a window of
:data:`~dmdnet_plugin.pipeline.FRAMES_PER_RUN` photos, the photos whose faces one model call
restores together in :class:`~dmdnet_plugin.stream.PhotoStream`: the same batches, hence the same
pixels as ``dmdnet restore`` without Ray. Each stage calls the stream's own stage functions, so
there is no second copy of reading, restoring, pasting or writing.

Inputs and outputs are local folders or any URI pyarrow opens (``s3://``, ``gs://``): workers read
and write them directly, nothing goes through the driver but report entries. Ray restarts a dead
actor and retries its window; outputs are written atomically (an object store's put is), so a
window done twice still leaves one whole file. The driver keeps the run's journal (the CLI's), so
an interrupted run started again restores only what is missing.

Needs ``pip install "dmdnet-plugin[ray]"`` on the driver and on every node; the weights path must
be readable on every node (the bundled demo model is, inside the package).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .factory import RestorerSpec
from .identity import IdentityDictionary
from .io import IMAGE_EXTENSIONS, Picture, decode_image, encode_image, list_images, read_image, write_image
from .pipeline import FRAMES_PER_RUN, Mode, checked_mode, chunks, needs_embeddings
from .stream import PhotoJob, StreamOptions, find_faces, paste_photo, read_photo, restore_window, write_photo


class ClusterError(RuntimeError):
    """A problem with the cluster or a location that stops the whole run."""


@dataclass(frozen=True)
class Storage:
    """A folder on a pyarrow filesystem: a local folder, or a URI such as ``s3://bucket/photos``.

    Paths handed to the stages are the filesystem's own (``bucket/photos/a.jpg``); reports show
    :meth:`name` (the URI again). Local folders use the project's atomic writes.
    """

    fs: object  # pyarrow.fs.FileSystem
    root: str
    scheme: str | None = None  # None: local

    @classmethod
    def open(cls, location: str | Path) -> Storage:
        from pyarrow import fs as pafs

        text = str(location)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), text)
        try:
            filesystem, root = pafs.FileSystem.from_uri(text)
        except Exception as exc:
            raise ClusterError(f"{text}: cannot open ({exc})") from None
        if isinstance(filesystem, pafs.LocalFileSystem):  # file:// URIs: a local folder
            return cls(filesystem, root)
        return cls(filesystem, root, text.split("://", 1)[0])

    @property
    def local(self) -> bool:
        return self.scheme is None

    def name(self, path: str) -> str:
        """How reports show a path of this storage: as given for local files, else as a URI."""
        return path if self.local else f"{self.scheme}://{path}"

    def path(self, name: str) -> str:
        """The filesystem's own path of ``name`` (a URI or a path), the inverse of :meth:`name`."""
        return name if self.local else name.split("://", 1)[-1]

    def images(self, inputs: Sequence[str]) -> list[str]:
        """The photos of ``inputs`` (files, or folders searched recursively), sorted like the CLI's."""
        if self.local:
            return [str(p) for p in list_images([Storage.open(i).root for i in inputs])]
        from pyarrow import fs as pafs

        found: list[str] = []
        for item in inputs:
            root = self.path(str(item))
            info = self.fs.get_file_info(root)
            if info.type == pafs.FileType.Directory:
                listed = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
                found += sorted(
                    i.path
                    for i in listed
                    if i.type == pafs.FileType.File and PurePosixPath(i.path).suffix.lower() in IMAGE_EXTENSIONS
                )
            else:
                found.append(root)
        return found

    def join(self, name: str) -> str:
        return str(PurePosixPath(self.root) / name) if not self.local else str(Path(self.root) / name)

    def exists(self, name: str) -> bool:
        """Whether a file is there (``name``: a path of this storage, or as :meth:`name` shows it)."""
        from pyarrow import fs as pafs

        path = self.path(name)
        return bool(path) and self.fs.get_file_info(path).type == pafs.FileType.File

    def load(self, path: Path) -> Picture:
        if self.local:
            return read_image(path)  # the CLI's own reading and messages
        with self.fs.open_input_file(str(path)) as f:
            return decode_image(f.readall(), self.name(str(path)))

    def save(self, path: Path, pixels: np.ndarray, alpha: np.ndarray | None) -> None:
        if self.local:
            write_image(path, pixels, alpha)
            return
        data = encode_image(pixels, alpha, path.suffix)
        self.fs.create_dir(str(path.parent), recursive=True)
        with self.fs.open_output_stream(str(path)) as f:  # an object appears whole on close
            f.write(data)


@dataclass(frozen=True)
class RayPlan:
    """How the stages are spread. ``restore_actors``: None: one per GPU of the cluster (each with
    ``gpus_per_restore``), or one on CPU without GPUs. ``detect_actors``: the most detect actors
    Ray Data may scale up to (None: one per CPU the restore actors leave)."""

    restore_actors: int | None = None
    cpus_per_restore: float = 1.0
    gpus_per_restore: float = 1.0
    detect_actors: int | None = None
    cpus_per_detect: float = 0.5
    cpus_per_task: float = 0.25  # read, paste, write: mostly waiting on files, decoding and encoding
    ray_init: dict = field(default_factory=dict)  # extra ray.init arguments (a runtime_env, say)


@dataclass(frozen=True)
class _Window:
    """A row: the window's photos at one stage. An object, so Ray Data stores it as it is."""

    items: tuple


def _each(batch: dict, step) -> dict:
    return {"window": np.array([_Window(tuple(step(w.items))) for w in batch["window"]], object)}


def _read(batch: dict, source: Storage) -> dict:
    return _each(batch, lambda jobs: [read_photo(job, source.load) for job in jobs])


class _Detect:
    """Finds the faces of a window's photos (dlib or RetinaFace on CPU), once loaded per actor."""

    def __init__(self, spec: RestorerSpec, aligned: bool, embed: bool) -> None:
        self.helper = spec.face_helper("cpu")
        self.aligned, self.embed = aligned, embed

    def __call__(self, batch: dict) -> dict:
        return _each(batch, lambda items: [find_faces(i, self.helper, self.aligned, self.embed) for i in items])


class _Restore:
    """Holds the model (on this actor's GPU, or CPU) and restores a window's faces in one batch."""

    def __init__(self, spec: RestorerSpec, identities: tuple[IdentityDictionary, ...], mode: Mode) -> None:
        import ray

        self.restorer = spec.build("cuda" if ray.get_gpu_ids() else "cpu", identities)
        self.mode = mode  # checked by restore_on_ray

    def __call__(self, batch: dict) -> dict:
        identities = self.restorer.identities
        return _each(batch, lambda items: restore_window(self.restorer, items, self.mode, identities))


def _paste(batch: dict, options: StreamOptions) -> dict:
    return _each(batch, lambda items: [paste_photo(item, faces, options) for item, faces in items])


def _write(batch: dict, options: StreamOptions, target: Storage) -> dict:
    entries = [[write_photo(p, options, target.save) for p in w.items] for w in batch["window"]]
    return {"entries": np.array([json.dumps(e) for e in entries], object)}


def _check_listening(address: str | None) -> None:
    """Fail at once when nothing listens at a host:port address (ray.init would retry for minutes)."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # None (start one here), "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def restore_on_ray(
    jobs: Sequence[PhotoJob],
    options: StreamOptions,
    spec: RestorerSpec,
    identities: Sequence[IdentityDictionary] = (),
    plan: RayPlan = RayPlan(),
    source: Storage | None = None,
    target: Storage | None = None,
    address: str | None = None,
) -> Iterator[dict]:
    """Restore ``jobs`` on the Ray cluster at ``address`` (None: Ray's rule: ``$RAY_ADDRESS``, the
    cluster this machine runs, else one started for this process; ignored when this process is
    already connected); the report entries as windows finish, in no set order.

    ``source`` and ``target``: where the jobs' paths are (default: local files).
    """
    import ray

    identities = tuple(identities)
    mode = checked_mode(options.mode, identities)
    source, target = source or Storage.open("."), target or Storage.open(".")
    if not ray.is_initialized():
        _check_listening(address)
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING", **plan.ray_init)
        except Exception as exc:  # no cluster there, or its token is missing (RAY_AUTH_MODE=token)
            where = f"the Ray cluster at {address}" if address else "Ray"
            raise ClusterError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows progress (the CLI: one bar over photos)
    context.enable_fallback_to_arrow_object_ext_type = True  # rows are Python objects, on purpose
    for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) if plan.gpus_per_restore else 0
    n_restore = plan.restore_actors or max(1, int(gpus // plan.gpus_per_restore) if gpus else 1)
    n_detect = plan.detect_actors or max(1, int(resources.get("CPU", 1) - n_restore * plan.cpus_per_restore))
    windows = [{"window": _Window(tuple(w))} for w in chunks(jobs, FRAMES_PER_RUN)]
    if not windows:
        return
    task = {"batch_size": 1, "num_cpus": plan.cpus_per_task}
    ds = ray.data.from_items(windows, override_num_blocks=len(windows))
    ds = ds.map_batches(_read, fn_kwargs={"source": source}, **task)
    ds = ds.map_batches(
        _Detect,
        fn_constructor_kwargs={"spec": spec, "aligned": options.aligned, "embed": needs_embeddings(mode, identities)},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_detect),
        batch_size=1,
        num_cpus=plan.cpus_per_detect,
    )
    ds = ds.map_batches(
        _Restore,
        fn_constructor_kwargs={"spec": spec, "identities": identities, "mode": mode},
        compute=ray.data.ActorPoolStrategy(size=n_restore),
        batch_size=1,
        num_cpus=plan.cpus_per_restore,
        num_gpus=plan.gpus_per_restore if gpus else None,
    )
    ds = ds.map_batches(_paste, fn_kwargs={"options": options}, **task)
    ds = ds.map_batches(_write, fn_kwargs={"options": options, "target": target}, **task)
    for row in ds.iter_rows():
        for entry in json.loads(row["entries"]):
            yield {
                **entry,
                "input": source.name(entry["input"]),
                "output": None if entry["output"] is None else target.name(entry["output"]),
            }
