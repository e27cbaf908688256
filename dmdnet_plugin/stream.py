"""A folder of photos through the Restorer with the model kept busy, and runs that resume.

Photos go through three stages: read and find the faces (one thread: dlib is not thread-safe),
restore the faces of a window of photos together (the model, in batches across the photos), then
keep colours, paste back and write (threads). While the model restores one window, the threads
read the next photos and write the last ones, so the model waits for neither; on the CPU it
leaves them a core each while they have work (:class:`CoreShare`). At most a few
windows are held at once, whatever the folder's size. Batches are made from the photos in input
order, ``window`` at a time, the same way with or without threads, so ``workers=0`` (one stage
after the other, the reference path) gives the same pixels and report.

A run keeps a journal (``journal_path``: in the cache folder, one per output folder, so the output
folder holds only outputs): one line per finished input, written by the thread that wrote the
output, right after it (outputs are written atomically). Started again with the same settings, after a
crash or a kill, it restores only the inputs the journal lacks and ends with one report of all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .face_helper import Detection, FaceHelper
from .identity import IdentityDictionary, IdentityError
from .io import ImageError, ImageWriter, Picture, read_image, refuse_overwrite, write_image
from .pipeline import (
    FRAMES_PER_RUN,
    ImageResult,
    Mode,
    Progress,
    Restorer,
    checked_mode,
    chunks,
    needs_embeddings,
    save_faces,
)
from .runtime import cache_dir

_LOCK = threading.Lock()


@dataclass(frozen=True)
class PhotoJob:
    """One input photo and where its output goes."""

    src: Path
    dst: Path


@dataclass(frozen=True)
class StreamOptions:
    """What a photo run does to every photo: the CLI's restore options."""

    mode: str = Mode.AUTO.value
    aligned: bool = False
    upscale: float = 1.0
    strength: float = 1.0
    keep_colours: bool = True
    save_faces: bool = False


Read = tuple[PhotoJob, Picture] | tuple[PhotoJob, Exception]
Prepared = tuple[PhotoJob, Picture, Detection] | tuple[PhotoJob, Exception]
Pasted = tuple[PhotoJob, ImageResult] | dict  # dict: the error entry of a photo that failed
Done = Callable[[dict], None]  # told of each report entry as soon as its output is written


def error_entry(src: Path, error: Exception) -> dict:
    """The report entry of an input that failed: one line naming the file and the problem."""
    if isinstance(error, (ImageError, IdentityError, OSError)):
        text = str(error) if str(src) in str(error) else f"{src}: {error}"
    else:  # an unexpected failure still names the file, and the batch goes on
        text = f"{src}: {type(error).__name__}: {error}"
    return {"input": str(src), "output": None, "status": "error", "error": text}


class PhotoStream:
    """Restores photos with ``restorer``: one thread reads and finds faces, ``workers`` threads paste
    and write, around the model in the calling thread (``workers=0``: no threads, the reference)."""

    def __init__(
        self, restorer: Restorer, options: StreamOptions, workers: int = 2, window: int = FRAMES_PER_RUN
    ) -> None:
        self.restorer, self.options = restorer, options
        self.seconds = {"read": 0.0, "model": 0.0, "write": 0.0}  # time in each stage (benchmarks/throughput.py)
        self._pools: tuple[Executor, Executor] | None = None
        self.identities = restorer.identities
        self.mode = checked_mode(options.mode, self.identities)
        self.embed = needs_embeddings(self.mode, self.identities)
        self.workers, self.window = max(0, workers), max(1, window)

    # ----------------------------------------------------------------- stages
    def _prepare(self, job: PhotoJob) -> Prepared:
        """Read a photo and find its faces (in the calling thread, or in the one reader thread)."""
        with _timed(self.seconds, "read"):
            return self._find(job)

    def _timed_read(self, job: PhotoJob) -> tuple[Prepared, float]:
        start = time.perf_counter()
        return self._find(job), time.perf_counter() - start

    def _find(self, job: PhotoJob) -> Prepared:
        return find_faces(read_photo(job), self.restorer.helper, self.options.aligned, self.embed)

    def _restore_window(
        self, window: list[Prepared], progress: Progress | None = None
    ) -> list[tuple[Prepared, tuple | None]]:
        with _timed(self.seconds, "model"):
            return restore_window(self.restorer, window, self.mode, self.identities, progress)

    def _completed(self, item: Prepared, faces: tuple | None, done: Done | None) -> dict:
        """Colours, paste-back and the atomic write of one photo, then ``done(entry)`` (thread-safe)."""
        with _timed(self.seconds, "write"):
            entry = write_photo(paste_photo(item, faces, self.options), self.options)
        if done:
            done(entry)
        return entry

    # ------------------------------------------------------------------ runs
    def run(self, jobs: Iterable[PhotoJob], done: Done | None = None) -> Iterator[dict]:
        """Report entries, in input order, as the photos are written.

        ``done(entry)`` is called as each output is written, in the thread that wrote it (so from two
        threads at once): the entries come out in order, a window or so after their outputs, and a
        journal kept at that pace would miss outputs a kill left whole."""
        if self.workers == 0:
            yield from self._run_inline(jobs, done)
            return
        if self._pools is None:  # one reader: the face backend (dlib) is not safe to call from two threads
            self._pools = (
                ThreadPoolExecutor(1, thread_name_prefix="dmdnet-read"),
                ThreadPoolExecutor(self.workers, thread_name_prefix="dmdnet-write"),
            )
        yield from self._run_overlapped(jobs, *self._pools, done)

    def __enter__(self) -> PhotoStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader and the writers (a stream used outside ``with`` must be closed)."""
        for pool in self._pools or ():
            pool.shutdown(cancel_futures=True)
        self._pools = None

    def _received(self, future: Future) -> Prepared:
        item, seconds = future.result()
        with _LOCK:
            self.seconds["read"] += seconds
        return item

    def _run_inline(self, jobs: Iterable[PhotoJob], done: Done | None) -> Iterator[dict]:
        for window in chunks((self._prepare(job) for job in jobs), self.window):
            for item, faces in self._restore_window(window):
                yield self._completed(item, faces, done)

    def _run_overlapped(
        self,
        jobs: Iterable[PhotoJob],
        reader: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        done: Done | None,
    ) -> Iterator[dict]:
        ahead: deque[Future] = deque()  # photos being read: at most two windows ahead of the model
        writing: deque[Future] = deque()  # photos being finished, in input order
        jobs = iter(jobs)

        def busy() -> int:
            """How many of the stage threads have work now (each wants a core)."""
            writes = sum(not f.done() for f in writing)
            return int(not all(f.done() for f in ahead)) + min(self.workers, writes)

        def prepared() -> Iterator[Prepared]:
            for job in jobs:
                ahead.append(reader.submit(self._timed_read, job))
                if len(ahead) >= 2 * self.window:
                    yield self._received(ahead.popleft())
            while ahead:
                yield self._received(ahead.popleft())

        share = CoreShare(busy) if self.restorer.loaded.device.type == "cpu" else None
        try:
            for window in chunks(prepared(), self.window):
                for item, faces in self._restore_window(window, share):
                    writing.append(writer.submit(self._completed, item, faces, done))
                while len(writing) > self.window:  # bounded: finish the oldest while the model moves on
                    yield writing.popleft().result()
            while writing:
                yield writing.popleft().result()
        finally:
            if share:
                share.restore()


class CoreShare:
    """On the CPU, the model leaves a core to each stage thread that has work, batch by batch.

    torch's threads meet at the end of every operation, so one of them sharing a core with dlib
    holds the model to that core's pace while the others wait on both cores: two threads with the
    reader busy restored fewer photos per second than one (docs/speed.md). Called before each
    batch (as the model's progress callback), it sets torch's threads to the machine's share left
    by the busy stages, at least one; ``restore`` puts back the count it found. torch's thread
    count is the process's, so two streams should not run at once in one process.
    """

    def __init__(self, busy: Callable[[], int]) -> None:
        self.busy, self.cores = busy, torch.get_num_threads()
        self()

    def __call__(self, *_progress: int) -> None:
        torch.set_num_threads(max(1, self.cores - self.busy()))

    def restore(self) -> None:
        torch.set_num_threads(self.cores)


# The stages of a photo, shared by PhotoStream and the Ray Data operators (:mod:`cluster`). A failure
# is passed on, not raised, so that the photo ends as one error entry and the batch goes on.
def read_photo(job: PhotoJob, load: Callable[[Path], Picture] = read_image) -> Read:
    """The photo of ``job`` (``load``: from a local file, or a cluster's filesystem)."""
    try:
        refuse_overwrite(job.src, job.dst)
        return job, load(job.src)
    except Exception as exc:
        return job, exc


def find_faces(item: Read, helper: FaceHelper, aligned: bool, embed: bool) -> Prepared:
    """The faces of a photo read by :func:`read_photo`."""
    job, picture = item
    if isinstance(picture, Exception):
        return item
    try:
        return job, picture, helper.find([picture], aligned, embed=embed)[0]
    except Exception as exc:
        return job, exc


def restore_window(
    restorer: Restorer,
    window: Sequence[Prepared],
    mode: Mode,
    identities: Sequence[IdentityDictionary],
    progress: Progress | None = None,
) -> list[tuple[Prepared, tuple | None]]:
    """The model stage: the faces of every good photo of a window, batched across them; if the model
    fails, each of the window's photos is an error. ``progress``: called after each batch."""
    good = [p for p in window if len(p) == 3]
    try:
        faces = iter(restorer.restore_faces([p[2] for p in good], mode, identities, progress))
    except Exception as exc:
        return [((p[0], exc), None) if len(p) == 3 else (p, None) for p in window]
    return [(p, next(faces) if len(p) == 3 else None) for p in window]


def paste_photo(item: Prepared, faces: tuple | None, options: StreamOptions) -> Pasted:
    """Colours and paste-back (no model: :meth:`Restorer.finish`), or the error entry of a failed photo."""
    if faces is None:
        return error_entry(item[0].src, item[1])
    job, picture, detection = item
    try:
        return job, Restorer.finish(picture, detection, faces, options.upscale, options.strength, options.keep_colours)
    except Exception as exc:
        return error_entry(job.src, exc)


def write_photo(pasted: Pasted, options: StreamOptions, save: ImageWriter = write_image) -> dict:
    """Write a pasted photo atomically (``save``); its report entry."""
    if isinstance(pasted, dict):
        return pasted
    job, result = pasted
    try:
        save(job.dst, result.pixels, result.alpha)
        if options.save_faces:
            save_faces(result, job.dst.parent, job.src.stem, save)
    except Exception as exc:
        return error_entry(job.src, exc)
    entry = {
        "input": str(job.src),
        "output": str(job.dst),
        "status": "ok" if result.faces else "no_face",
        "error": None,
        "faces": [f.record() for f in result.faces],
    }
    if result.skipped:
        entry["skipped_faces"] = list(result.skipped)
    return entry


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        with _LOCK:  # two writer threads add to the same stage
            seconds[stage] += time.perf_counter() - start


def journal_path(folder: str | Path) -> Path:
    """Where the journal of the runs into ``folder`` (a local folder or a URI) is kept."""
    where = str(folder) if "://" in str(folder) else str(Path(folder).resolve())
    key = hashlib.sha256(where.encode()).hexdigest()[:16]
    return cache_dir() / "runs" / f"{key}.jsonl"


class Journal:
    """The finished inputs of the runs into an output folder with given settings, one JSON line each.

    Appended and flushed after each output is written, so a run killed at any moment leaves at
    worst one partial last line, which is ignored. A journal of other settings is started afresh.
    """

    def __init__(
        self, folder: str | Path, settings: dict, resume: bool = True, exists: Callable[[str], bool] = os.path.isfile
    ) -> None:
        self.folder, self.path, self.exists = Path(folder), journal_path(folder), exists
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        try:
            lines = self.path.read_text().splitlines() if resume else []
        except OSError:
            lines = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short
            if record.get("settings") == self.key and isinstance(record.get("entry"), dict):
                self.entries[record["entry"]["input"]] = record["entry"]

    def finished(self, src: str | Path) -> dict | None:
        """The entry of an input this run already finished, if its output is still there (``exists``)."""
        entry = self.entries.get(str(src))
        if entry is None or entry["status"] == "error" or not self.exists(entry["output"] or ""):
            return None  # never done, failed (tried again), or its output is gone
        return entry

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.part*"):  # what a killed run was writing (atomic.atomic_path)
            stale.unlink(missing_ok=True)
        keep = [json.dumps({"settings": self.key, "entry": e}) for e in self.entries.values()]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))  # this run's settings only
        tmp.replace(self.path)
        self._file = open(self.path, "a")
        return self

    def add(self, entry: dict) -> None:
        """Record a finished input (from any thread: the stream's writers call it)."""
        with self._lock:
            self.entries[entry["input"]] = entry
            self._file.write(json.dumps({"settings": self.key, "entry": entry}) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def __exit__(self, *exc) -> None:
        self._file.close()
