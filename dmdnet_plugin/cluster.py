"""Archives on a Ray cluster: the photo stream's stages as Ray Data operators, one photo per row.

read (tasks: the file's bytes) -> detect (CPU actors holding the face backend: decode, find the
faces) -> restore (actors holding the model: one per GPU, or on CPU) -> finish (tasks: decode,
colours, paste-back, the atomic write; the report entry). A row's columns are what Arrow stores as
it is (strings, bytes, numpy arrays: :func:`detection_columns`, :func:`result_columns`), so no
object of ours is pickled between stages. The model stage takes ``batch_size`` =
:data:`~dmdnet_plugin.pipeline.FRAMES_PER_RUN` rows, laid out (:func:`restore_on_ray`) so that each
batch is a window of the photo stream (:class:`~dmdnet_plugin.stream.PhotoStream`): the faces are
batched the same way, hence the same pixels as ``dmdnet restore`` on the same device and thread
count (docs/scale.md). Each stage calls the stream's own stage functions, so there is no second
copy of reading, restoring, pasting or writing. :class:`RayEngine` is the run's engine
(:func:`dmdnet_plugin.runs.restore_files`), as the photo stream is on one machine.

Inputs and outputs are local folders or any URI pyarrow opens (``s3://``, ``gs://``): workers read
and write them directly, nothing goes through the driver but report entries. Ray restarts a dead
actor and retries its task; outputs are written atomically (an object store's put is), so a
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
import torch

from .atomic import TOKEN, atomic_path
from .components import CROP_SIZE
from .face_helper import AlignedFace, Detection
from .faces import Face
from .identity import IdentityDictionary
from .io import decode_image, encode_image, read_image_file
from .journal import LocalFiles, Stamp
from .matching import Match
from .outputs import Found, Job, Plan, local_inputs, plan_jobs
from .pipeline import FRAMES_PER_RUN, FaceResult, Mode, checked_mode, chunks, needs_embeddings
from .report import Entry
from .runtime import pick_precision, precision_name
from .settings import RunSettings
from .stream import Done, PhotoItem, find_faces, paste_photo, read_photo, restore_window, write_photo
from .video import INPUT_EXTENSIONS, is_video


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
        if self.local:
            return local_inputs([Storage.open(i).root for i in inputs], output, INPUT_EXTENSIONS)
        from pyarrow import fs as pafs

        found: list[Found] = []
        for item in inputs:
            root = self.path(str(item))
            if self.fs.get_file_info(root).type != pafs.FileType.Directory:
                found.append(Found(self.name(root), PurePosixPath(PurePosixPath(root).name)))
                continue
            listed = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
            for info in sorted(listed, key=lambda i: i.path):
                if info.type == pafs.FileType.File and PurePosixPath(info.path).suffix.lower() in INPUT_EXTENSIONS:
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

    def read(self, path: str) -> bytes:
        """A file's bytes; one that cannot be read fails as without Ray (:func:`read_image_file`'s message)."""
        if not self.local:
            with self.fs.open_input_file(path) as f:
                return f.readall()
        return read_image_file(path)

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
    cpus_per_task: float = 0.25  # read and finish: mostly waiting on files, decoding and encoding
    ray_init: dict = field(default_factory=dict)  # extra ray.init arguments (a runtime_env, say)


# ------------------------------------------------------------------ rows
# A row is one photo, in columns Arrow stores as they are: its job (``src``, ``dst``), its ``window``
# (which FRAMES_PER_RUN photos the model restores together) and that window's count of ``photos``,
# ``error`` (the report's text once the photo has failed; empty until then), the file's bytes, then
# its faces as arrays and the model's crops. Nothing of ours is pickled into a row.
_FACES = {  # column: (the value of one face, its shape and dtype: a column has one dtype, a row without faces too)
    "crops": (lambda f: f.crop, (CROP_SIZE, CROP_SIZE, 3), np.float32),
    "matrices": (lambda f: f.matrix, (2, 3), np.float64),
    "part_boxes": (lambda f: f.boxes, (4, 4), np.int64),
    "face_boxes": (lambda f: f.face.box, (4,), np.float64),
    "landmarks": (lambda f: f.face.landmarks, (68, 2), np.float64),
    "scores": (lambda f: f.face.score, (), np.float64),
}


def _stacked(values: list, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """One row's values as one array of ``dtype``, the dtype they are made in (tests/test_ray.py checks)."""
    return np.stack(values).astype(dtype, copy=False) if values else np.zeros((0, *shape), dtype)


def detection_columns(detection: Detection) -> dict:
    """A photo's faces as a row's columns: arrays, and in ``notes`` (JSON) how each face's part boxes
    were found and the faces left out. Embeddings are there for every face or for none (only
    matching needs them): (n, 0) when none."""
    faces = detection.faces
    columns = {name: _stacked([get(f) for f in faces], shape, dtype) for name, (get, shape, dtype) in _FACES.items()}
    embeddings = [f.face.embedding for f in faces]
    embedded = embeddings and all(e is not None for e in embeddings)
    columns["embeddings"] = np.stack(embeddings) if embedded else np.zeros((len(faces), 0))
    columns["notes"] = json.dumps({"boxes_from": [f.boxes_from for f in faces], "skipped": list(detection.skipped)})
    return columns


def columns_detection(row: dict) -> Detection:
    """The :class:`Detection` of :func:`detection_columns`, the same values and dtypes."""
    notes = json.loads(row["notes"])
    faces = tuple(
        AlignedFace(Face(box, landmarks, float(score), embedding if embedding.size else None), crop, matrix, boxes, how)
        for crop, matrix, boxes, box, landmarks, score, embedding, how in zip(
            *(row[name] for name in _FACES), row["embeddings"], notes["boxes_from"]
        )
    )
    return Detection(faces, tuple(notes["skipped"]))


def _index(identity: IdentityDictionary | None, identities: Sequence[IdentityDictionary]) -> int | None:
    return None if identity is None else next(i for i, d in enumerate(identities) if d is identity)


def result_columns(faces: Sequence[FaceResult], identities: Sequence[IdentityDictionary]) -> dict:
    """The model's part of a photo as columns: the restored crops, and each face's identity (by its
    index in ``identities``), matching decision and why it was left as it was, as JSON."""
    decisions = []
    for face in faces:
        match = None
        if face.match is not None:
            match = {f.name: getattr(face.match, f.name) for f in fields(face.match)}
            match["identity"] = _index(face.match.identity, identities)
        decisions.append({"identity": _index(face.identity, identities), "match": match, "why": face.left_as_is})
    restored = [f.restored for f in faces if f.restored is not None]
    return {"restored": _stacked(restored, (CROP_SIZE, CROP_SIZE, 3), np.float32), "decisions": json.dumps(decisions)}


def columns_results(row: dict, detection: Detection, identities: Sequence[IdentityDictionary]) -> tuple:
    """The :class:`FaceResult` of each face of :func:`result_columns`."""
    restored, results = iter(row["restored"]), []
    for face, decision in zip(detection.faces, json.loads(row["decisions"])):
        match = decision["match"]
        if match is not None:
            match = Match(**{**match, "identity": _at(identities, match["identity"])})
        crop = None if decision["why"] is not None else next(restored)
        results.append(FaceResult(face, _at(identities, decision["identity"]), match, crop, decision["why"]))
    return tuple(results)


def _at(identities: Sequence[IdentityDictionary], index: int | None) -> IdentityDictionary | None:
    return None if index is None else identities[index]


def _rows(batch: dict) -> list[dict]:
    """A batch (column -> values) as one dict per row."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _batch(rows: list[dict]) -> dict:
    """Rows as a batch again."""
    return {name: [row[name] for row in rows] for name in rows[0]}


def _job(row: dict) -> Job:
    return Job(str(row["src"]), str(row["dst"]))


def _failed(row: dict, error: Exception) -> dict:
    """The row of a photo that ends here: the report's text of the error, and no more data."""
    return {**row, "error": Entry.failed(row["src"], error).error, "data": b""}


# ---------------------------------------------------------------- stages
def _read(batch: dict, source: Storage) -> dict:
    """The files' bytes (decoded where the pixels are needed, so that what crosses stages stays small)."""
    rows = []
    for row in _rows(batch):
        try:
            rows.append({**row, "error": "", "data": source.read(row["src"])})
        except Exception as exc:
            rows.append(_failed(row, exc))
    return _batch(rows)


class _Detect:
    """Decodes each photo and finds its faces (dlib or RetinaFace on CPU), the backend loaded once per actor."""

    def __init__(self, settings: RunSettings, embed: bool, source: Storage) -> None:
        self.helper = settings.face_helper("cpu")
        self.aligned, self.embed, self.source = settings.aligned, embed, source

    def __call__(self, batch: dict) -> dict:
        return _batch([self._detect(row) for row in _rows(batch)])

    def _detect(self, row: dict) -> dict:
        if row["error"]:
            return {**row, **detection_columns(Detection(()))}
        item = read_photo(_job(row), lambda _: decode_image(row["data"], self.source.name(row["src"])))
        item = find_faces(item, self.helper, self.aligned, self.embed)
        if item.error is not None:
            return {**_failed(row, item.error), **detection_columns(Detection(()))}
        return {**row, **detection_columns(item.detection)}


class _Restore:
    """Holds the model (on this actor's GPU, or CPU) and restores the faces of a window's photos in
    batches across them, as :class:`~dmdnet_plugin.stream.PhotoStream` does."""

    def __init__(self, settings: RunSettings, mode: Mode) -> None:
        import ray

        self.restorer = settings.restorer("cuda" if ray.get_gpu_ids() else "cpu")
        self.mode = mode  # checked by restore_on_ray

    def __call__(self, batch: dict) -> dict:
        done = []
        for window in _windows(_rows(batch)):  # one: the rows as restore_on_ray lays them out
            if len(window) != window[0]["photos"]:  # only if a Ray Data release bundles rows otherwise
                logging.getLogger(__name__).warning(
                    "dmdnet: Ray Data gave the model %d of the %d photos of window %d: their faces are "
                    "batched otherwise than without --ray, so their pixels can differ in the last bits",
                    len(window),
                    window[0]["photos"],
                    window[0]["window"],
                )
            done += self._restore(window)
        return _batch(done)

    def _restore(self, rows: list[dict]) -> list[dict]:
        good = [row for row in rows if not row["error"]]
        items = [PhotoItem(_job(row), detection=columns_detection(row)) for row in good]
        restored = iter(restore_window(self.restorer, items, self.mode, self.restorer.identities))
        done = []
        for row in rows:
            if row["error"]:
                done.append({**row, **result_columns((), ())})
                continue
            item = next(restored)
            if item.error is not None:
                done.append({**_failed(row, item.error), **result_columns((), ())})
            else:
                done.append({**row, **result_columns(item.faces, self.restorer.identities)})
        return done


def _windows(rows: list[dict]) -> list[list[dict]]:
    """The rows of each window, in order: a batch never mixes the photos of two model batches."""
    windows: list[list[dict]] = []
    for row in rows:
        if not windows or windows[-1][0]["window"] != row["window"]:
            windows.append([])
        windows[-1].append(row)
    return windows


def _finish(batch: dict, settings: RunSettings, source: Storage, target: Storage) -> dict:
    """Colours, paste-back and the atomic write of each photo: its report entry (JSON), nothing else."""
    entries = []
    for row in _rows(batch):
        job = _job(row)
        if row["error"]:
            entry = Entry.failed(job.src, row["error"])
        else:
            detection = columns_detection(row)
            item = PhotoItem(
                job,
                picture=decode_image(row["data"], source.name(job.src)),
                detection=detection,
                faces=columns_results(row, detection, settings.dictionaries),
            )
            entry = write_photo(paste_photo(item, settings), settings, target.save)
        entries.append(json.dumps(entry.to_json()))
    return {"entry": entries}


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
    cluster at ``address`` (see :func:`connect`); the report entries in input order, as windows finish.

    The model stage's batches are the photo stream's windows: each window of FRAMES_PER_RUN photos
    is one block, ``preserve_order`` keeps the blocks in order, and the model stage gathers
    ``batch_size`` rows from consecutive blocks, so each of its batches is one window (docs/scale.md)."""
    import pyarrow as pa
    import ray

    mode = checked_mode(settings.mode, settings.dictionaries)
    source, target = source or Storage.open("."), target or Storage.open(".")
    connect(address, plan)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller shows progress (the CLI: one bar over photos)
    context.execution_options.preserve_order = True  # blocks in order: the model's batches are windows
    for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    windows = [
        pa.table(
            {"src": [j.src for j in w], "dst": [j.dst for j in w], "window": [k] * len(w), "photos": [len(w)] * len(w)}
        )
        for k, w in enumerate(chunks(jobs, FRAMES_PER_RUN))
    ]
    if not windows:
        return
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) if plan.gpus_per_restore else 0
    n_restore = plan.restore_actors or max(1, int(gpus // plan.gpus_per_restore) if gpus else 1)
    n_detect = plan.detect_actors or max(1, int(resources.get("CPU", 1) - n_restore * plan.cpus_per_restore))
    batches = {"batch_format": "numpy", "batch_size": FRAMES_PER_RUN}  # every stage: a window at a time
    ds = ray.data.from_arrow(windows)  # one block per window
    ds = ds.map_batches(_read, fn_kwargs={"source": source}, num_cpus=plan.cpus_per_task, **batches)
    ds = ds.map_batches(
        _Detect,
        fn_constructor_kwargs={
            "settings": settings,
            "embed": needs_embeddings(mode, settings.dictionaries),
            "source": source,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n_detect),
        num_cpus=plan.cpus_per_detect,
        **batches,
    )
    ds = ds.map_batches(
        _Restore,
        fn_constructor_kwargs={"settings": settings, "mode": mode},
        compute=ray.data.ActorPoolStrategy(size=n_restore),
        num_cpus=plan.cpus_per_restore,
        num_gpus=plan.gpus_per_restore if gpus else None,
        **batches,
    )
    ds = ds.map_batches(
        _finish,
        fn_kwargs={"settings": settings, "source": source, "target": target},
        num_cpus=plan.cpus_per_task,
        **batches,
    )
    for row in ds.iter_rows():
        entry = Entry.from_json(json.loads(row["entry"]))
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
        return plan_jobs(found, self.target.join, INPUT_EXTENSIONS, self.settings.save_faces)

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
