"""Archives on a Ray cluster: the photo stream's stages as Ray Data operators.

read (tasks) -> detect (CPU actors holding the face backend) -> restore (actors holding the model:
one per GPU, or on CPU) -> paste (tasks) -> write (tasks). A row is a window of
:data:`~dmdnet_plugin.pipeline.FRAMES_PER_RUN` photos, the photos whose faces one model call
restores together in :class:`~dmdnet_plugin.stream.PhotoStream`: the same batches, hence the same
pixels as ``dmdnet restore`` without Ray. Each stage calls the stream's own stage functions, so
there is no second copy of reading, restoring, pasting or writing. :class:`RayEngine` is the
run's engine (:func:`dmdnet_plugin.runs.restore_files`), as the photo stream is on one machine.

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
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
import torch

from .atomic import TOKEN, atomic_path
from .io import IMAGE_EXTENSIONS, Picture, decode_image, encode_image, read_image
from .journal import LocalFiles, Stamp
from .outputs import Found, Job, Plan, local_inputs, plan_jobs
from .pipeline import FRAMES_PER_RUN, Mode, checked_mode, chunks, needs_embeddings
from .report import Entry
from .runtime import pick_precision, precision_name
from .settings import RunSettings
from .stream import Done, find_faces, paste_photo, read_photo, restore_window, write_photo
from .video import VIDEO_EXTENSIONS, is_video


class ClusterError(RuntimeError):
    """A problem with the cluster or a location that stops the whole run."""


@dataclass(frozen=True)
class Storage:
    """A folder on a pyarrow filesystem: a local folder, or a URI such as ``s3://bucket/photos``.

    Paths handed to the stages are the filesystem's own (``bucket/photos/a.jpg``); reports show
    :meth:`name` (the URI again). Local folders use the project's atomic writes, their temporary
    files marked with the driver's ``token`` (the journal names it, so a later run removes them).
    """

    fs: object  # pyarrow.fs.FileSystem
    root: str
    scheme: str | None = None  # None: local
    token: str = TOKEN

    @classmethod
    def open(cls, location: str | Path) -> Storage:
        from pyarrow import fs as pafs

        text = str(location)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), os.path.abspath(text))  # workers may run elsewhere
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

    def found(self, inputs: Sequence[str], output: str) -> list[Found]:
        """The photos and videos of ``inputs`` (files, or folders searched recursively), sorted like
        a local run's, each with its path below the folder it was found in."""
        extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
        if self.local:
            return local_inputs([Storage.open(i).root for i in inputs], output, extensions)
        from pyarrow import fs as pafs

        found: list[Found] = []
        for item in inputs:
            root = self.path(str(item))
            if self.fs.get_file_info(root).type != pafs.FileType.Directory:
                found.append(Found(self.name(root), PurePosixPath(PurePosixPath(root).name)))
                continue
            listed = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
            for info in sorted(listed, key=lambda i: i.path):
                if info.type == pafs.FileType.File and PurePosixPath(info.path).suffix.lower() in extensions:
                    found.append(Found(self.name(info.path), PurePosixPath(info.path).relative_to(root)))
        return found

    def join(self, relative: PurePath) -> str:
        """The name of ``relative`` below this storage's root."""
        if self.local:
            return str(Path(self.root) / relative)
        return self.name(str(PurePosixPath(self.root) / relative.as_posix()))

    def stamp(self, name: str) -> Stamp | None:
        """A file's size and time (no content hash: that would read the file through the network)."""
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(self.path(name))
        return Stamp(info.size, info.mtime_ns or 0) if info.type == pafs.FileType.File else None

    def load(self, path: str) -> Picture:
        if self.local:
            return read_image(path)  # the CLI's own reading and messages
        with self.fs.open_input_file(path) as f:
            return decode_image(f.readall(), self.name(path))

    def save(self, path: Path, pixels: np.ndarray, alpha: np.ndarray | None) -> None:
        data = encode_image(pixels, alpha, path.suffix)
        if self.local:
            with atomic_path(path, self.token) as tmp:
                tmp.write_bytes(data)
            return
        self.fs.create_dir(str(path.parent), recursive=True)
        with self.fs.open_output_stream(str(path)) as f:  # an object appears whole on close
            f.write(data)


class StoredFiles:
    """How a run on a cluster looks at files: local ones as on one machine, others through their storage."""

    def __init__(self, source: Storage, target: Storage) -> None:
        self.local, self.stores = LocalFiles(), {s.scheme: s for s in (source, target)}

    def stamp(self, name: str, content: bool) -> Stamp | None:
        store = self.stores.get(name.split("://", 1)[0] if "://" in name else None)
        return self.local.stamp(name, content) if store is None or store.local else store.stamp(name)

    def usable(self, name: str, written: Stamp) -> bool:
        if "://" not in name:
            return self.local.usable(name, written)
        now = self.stamp(name, content=False)
        return now is not None and now.size > 0

    def remove_leftovers(self, folder: str, tokens: set[str]) -> None:
        if "://" not in folder:  # an object store's upload appears whole or not at all
            self.local.remove_leftovers(folder, tokens)


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

    def __init__(self, settings: RunSettings, embed: bool) -> None:
        self.helper = settings.face_helper("cpu")
        self.aligned, self.embed = settings.aligned, embed

    def __call__(self, batch: dict) -> dict:
        return _each(batch, lambda items: [find_faces(i, self.helper, self.aligned, self.embed) for i in items])


class _Restore:
    """Holds the model (on this actor's GPU, or CPU) and restores a window's faces in one batch."""

    def __init__(self, settings: RunSettings, mode: Mode) -> None:
        import ray

        self.restorer = settings.restorer("cuda" if ray.get_gpu_ids() else "cpu")
        self.mode = mode  # checked by restore_on_ray

    def __call__(self, batch: dict) -> dict:
        identities = self.restorer.identities
        return _each(batch, lambda items: restore_window(self.restorer, items, self.mode, identities))


def _paste(batch: dict, settings: RunSettings) -> dict:
    return _each(batch, lambda items: [paste_photo(item, settings) for item in items])


def _write(batch: dict, settings: RunSettings, target: Storage) -> dict:
    entries = [[write_photo(p, settings, target.save).to_json() for p in w.items] for w in batch["window"]]
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


def connect(address: str | None = None, plan: RayPlan = RayPlan()) -> None:
    """Connect this process to the Ray cluster at ``address`` (None: Ray's rule: ``$RAY_ADDRESS``,
    the cluster this machine runs, else one started for this process); nothing when connected."""
    import ray

    if ray.is_initialized():
        return
    _check_listening(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING", **plan.ray_init)
    except Exception as exc:  # no cluster there, or its token is missing (RAY_AUTH_MODE=token)
        where = f"the Ray cluster at {address}" if address else "Ray"
        raise ClusterError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from None


def restore_on_ray(
    jobs: Sequence[Job],
    settings: RunSettings,
    plan: RayPlan = RayPlan(),
    source: Storage | None = None,
    target: Storage | None = None,
    address: str | None = None,
) -> Iterator[Entry]:
    """Restore ``jobs`` (photos; paths of ``source`` and ``target``, default local files) on the Ray
    cluster at ``address`` (see :func:`connect`); the report entries as windows finish, in no set order."""
    import ray

    mode = checked_mode(settings.mode, settings.dictionaries)
    source, target = source or Storage.open("."), target or Storage.open(".")
    connect(address, plan)
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
        fn_constructor_kwargs={"settings": settings, "embed": needs_embeddings(mode, settings.dictionaries)},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_detect),
        batch_size=1,
        num_cpus=plan.cpus_per_detect,
    )
    ds = ds.map_batches(
        _Restore,
        fn_constructor_kwargs={"settings": settings, "mode": mode},
        compute=ray.data.ActorPoolStrategy(size=n_restore),
        batch_size=1,
        num_cpus=plan.cpus_per_restore,
        num_gpus=plan.gpus_per_restore if gpus else None,
    )
    ds = ds.map_batches(_paste, fn_kwargs={"settings": settings}, **task)
    ds = ds.map_batches(_write, fn_kwargs={"settings": settings, "target": target}, **task)
    for row in ds.iter_rows():
        for record in json.loads(row["entries"]):
            entry = Entry.from_json(record)
            yield entry.renamed(source.name(entry.input), None if entry.output is None else target.name(entry.output))


class RayEngine:
    """A run's engine on a Ray cluster (``dmdnet restore --ray``): photos only; a video is an error
    entry that says to restore it without Ray."""

    name = "ray"

    def __init__(
        self, settings: RunSettings, address: str | None = None, plan: RayPlan = RayPlan(), precision: str = "auto"
    ) -> None:
        """Connects to the cluster first: where it has GPUs, the model actors run there, and the
        settings say so (``precision``: as asked, resolved for the actors' device)."""
        import ray

        connect(address, plan)
        if plan.gpus_per_restore and ray.cluster_resources().get("GPU", 0):
            cuda = precision_name(pick_precision(precision, torch.device("cuda")))
            settings = replace(settings, device="cuda", precision=cuda)
        self.settings, self.address, self.ray_plan = settings, address, plan
        self.source: Storage | None = None
        self.target: Storage | None = None
        self.files: StoredFiles | None = None

    def plan(self, inputs: Sequence[str], output: str) -> Plan:
        sources = {Storage.open(i).scheme for i in inputs}
        if len(sources) > 1:
            raise ClusterError("--ray: the inputs must all be on one storage (local, or one URI scheme)")
        self.source, self.target = Storage.open(inputs[0]), Storage.open(output)
        self.files = StoredFiles(self.source, self.target)
        found = self.source.found(inputs, self.target.root if self.target.local else output)
        return plan_jobs(found, self.target.join, self.settings.save_faces)

    def restore(self, jobs: Sequence[Job], done: Done) -> Iterator[Entry]:
        for job in jobs:
            if is_video(job.src):
                entry = Entry.failed(job.src, f"{job.src}: videos are restored without --ray")
                done(entry)
                yield entry
        native = [Job(self.source.path(j.src), self.target.path(j.dst)) for j in jobs if not is_video(j.src)]
        for entry in restore_on_ray(native, self.settings, self.ray_plan, self.source, self.target, self.address):
            done(entry)  # the workers wrote its output before the entry came back
            yield entry
