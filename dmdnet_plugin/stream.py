"""A folder of photos through the Restorer with the model kept busy.

Photos go through three stages: read and find the faces (one thread: dlib is not thread-safe),
restore the faces of a window of photos together (the model, in batches across the photos), then
keep colours, paste back and write (threads). While the model restores one window, the threads
read the next photos and write the last ones, so the model waits for neither; on the CPU it
leaves them a core each while they have work (:class:`CoreShare`). At most a few
windows are held at once, whatever the folder's size. Batches are made from the photos in input
order, ``window`` at a time, the same way with or without threads, so ``workers=0`` (one stage
after the other, the reference path) gives the same pixels and report.

A photo travels through the stages as one :class:`PhotoItem`; a stage that fails sets its
``error`` and the later stages pass it on, so the photo ends as one error entry and the batch
goes on. The stage functions are shared with the Ray Data operators (:mod:`cluster`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .face_helper import Detection, FaceHelper
from .identity import IdentityDictionary
from .io import ImageWriter, Picture, read_image, refuse_overwrite, write_image
from .outputs import Job
from .pipeline import (
    FRAMES_PER_RUN,
    FaceResult,
    ImageResult,
    Mode,
    Progress,
    Restorer,
    checked_mode,
    chunks,
    needs_embeddings,
    save_faces,
)
from .report import Entry
from .settings import RunSettings

_LOCK = threading.Lock()
Done = Callable[[Entry], None]  # told of each report entry as soon as its output is written


@dataclass(frozen=True)
class PhotoItem:
    """A photo on its way through the stages: what each stage added, or the error that ended it."""

    job: Job
    picture: Picture | None = None
    detection: Detection | None = None
    faces: tuple[FaceResult, ...] | None = None  # the model's crops, before colours and paste-back
    result: ImageResult | None = None
    error: Exception | None = None

    def failed(self, error: Exception) -> PhotoItem:
        """The photo ends here. What it held is dropped, and so are the error's traceback and the errors
        it came from: their frames hold the file's bytes (two windows of bad 2 GiB files took 11 GB)."""
        error.__traceback__ = error.__context__ = error.__cause__ = None
        return PhotoItem(self.job, error=error)


class PhotoStream:
    """Restores photos with ``restorer`` as ``settings`` say: one thread reads and finds faces,
    ``workers`` threads paste and write, around the model in the calling thread (``workers=0``: no
    threads, the reference)."""

    def __init__(
        self, restorer: Restorer, settings: RunSettings, workers: int = 2, window: int = FRAMES_PER_RUN
    ) -> None:
        self.restorer, self.settings = restorer, settings
        self.seconds = {"read": 0.0, "model": 0.0, "write": 0.0}  # time in each stage (benchmarks/throughput.py)
        self._pools: tuple[Executor, Executor] | None = None
        self.identities = restorer.identities
        self.mode = checked_mode(settings.mode, self.identities)
        self.embed = needs_embeddings(self.mode, self.identities)
        self.workers, self.window = max(0, workers), max(1, window)

    # ----------------------------------------------------------------- stages
    def _prepare(self, job: Job) -> PhotoItem:
        """Read a photo and find its faces (in the calling thread, or in the one reader thread)."""
        with _timed(self.seconds, "read"):
            return self._find(job)

    def _timed_read(self, job: Job) -> tuple[PhotoItem, float]:
        start = time.perf_counter()
        return self._find(job), time.perf_counter() - start

    def _find(self, job: Job) -> PhotoItem:
        return find_faces(read_photo(job), self.restorer.helper, self.settings.aligned, self.embed)

    def _restore_window(self, window: list[PhotoItem], progress: Progress | None = None) -> list[PhotoItem]:
        with _timed(self.seconds, "model"):
            return restore_window(self.restorer, window, self.mode, self.identities, progress)

    def _completed(self, item: PhotoItem, done: Done | None) -> Entry:
        """Colours, paste-back and the atomic write of one photo, then ``done(entry)`` (thread-safe)."""
        with _timed(self.seconds, "write"):
            entry = write_photo(paste_photo(item, self.settings), self.settings)
        if done:
            done(entry)
        return entry

    # ------------------------------------------------------------------ runs
    def run(self, jobs: Iterable[Job], done: Done | None = None) -> Iterator[Entry]:
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

    def _received(self, future: Future) -> PhotoItem:
        item, seconds = future.result()
        with _LOCK:
            self.seconds["read"] += seconds
        return item

    def _run_inline(self, jobs: Iterable[Job], done: Done | None) -> Iterator[Entry]:
        for window in chunks((self._prepare(job) for job in jobs), self.window):
            for item in self._restore_window(window):
                yield self._completed(item, done)

    def _run_overlapped(
        self,
        jobs: Iterable[Job],
        reader: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        done: Done | None,
    ) -> Iterator[Entry]:
        ahead: deque[Future] = deque()  # photos being read: at most two windows ahead of the model
        writing: deque[Future] = deque()  # photos being finished, in input order
        jobs = iter(jobs)

        def busy() -> int:
            """How many of the stage threads have work now (each wants a core)."""
            writes = sum(not f.done() for f in writing)
            return int(not all(f.done() for f in ahead)) + min(self.workers, writes)

        def prepared() -> Iterator[PhotoItem]:
            for job in jobs:
                ahead.append(reader.submit(self._timed_read, job))
                if len(ahead) >= 2 * self.window:
                    yield self._received(ahead.popleft())
            while ahead:
                yield self._received(ahead.popleft())

        share = CoreShare(busy) if self.restorer.loaded.device.type == "cpu" else None
        try:
            for window in chunks(prepared(), self.window):
                if share:  # the last window's photos are being written now: their threads want cores
                    share()
                for item in self._restore_window(window, share):
                    writing.append(writer.submit(self._completed, item, done))
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
    reader busy restored fewer photos per second than one (docs/speed.md). Called as each window
    starts (the last window's photos are then being written) and after each batch (as the model's
    progress callback), it sets torch's threads to the machine's share left by the busy stages, at
    least one; ``restore`` puts back the count it found. torch's thread
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
def read_photo(job: Job, load: Callable[[str], Picture] = read_image) -> PhotoItem:
    """The photo of ``job`` (``load``: from a local file, or a cluster's filesystem)."""
    item = PhotoItem(job)
    try:
        refuse_overwrite(Path(job.src), Path(job.dst))
        return replace(item, picture=load(job.src))
    except Exception as exc:
        return item.failed(exc)


def find_faces(item: PhotoItem, helper: FaceHelper, aligned: bool, embed: bool) -> PhotoItem:
    """The faces of a photo read by :func:`read_photo`."""
    if item.error is not None:
        return item
    try:
        return replace(item, detection=helper.find([item.picture], aligned, embed=embed)[0])
    except Exception as exc:
        return item.failed(exc)


def restore_window(
    restorer: Restorer,
    window: Sequence[PhotoItem],
    mode: Mode,
    identities: Sequence[IdentityDictionary],
    progress: Progress | None = None,
) -> list[PhotoItem]:
    """The model stage: the faces of every good photo of a window, batched across them; if the model
    fails, each of the window's photos is an error. ``progress``: called after each batch."""
    good = [item for item in window if item.error is None]
    try:
        faces = iter(restorer.restore_faces([item.detection for item in good], mode, identities, progress))
    except Exception as exc:
        return [item if item.error is not None else item.failed(exc) for item in window]
    return [item if item.error is not None else replace(item, faces=next(faces)) for item in window]


def paste_photo(item: PhotoItem, settings: RunSettings) -> PhotoItem:
    """Colours and paste-back (no model: :meth:`Restorer.finish`)."""
    if item.error is not None:
        return item
    try:
        result = Restorer.finish(
            item.picture,
            item.detection,
            item.faces,
            settings.upscale,
            settings.strength,
            settings.keep_colours,
            background=settings.background(),
        )
        return PhotoItem(item.job, result=result)
    except Exception as exc:
        return item.failed(exc)


def write_photo(item: PhotoItem, settings: RunSettings, save: ImageWriter = write_image) -> Entry:
    """Write a pasted photo atomically (``save``); its report entry."""
    if item.error is not None:
        return Entry.failed(item.job.src, item.error)
    result, dst = item.result, Path(item.job.dst)
    try:
        save(dst, result.pixels, result.alpha)
        if settings.save_faces:
            save_faces(result, dst.parent, dst.stem, save)
    except Exception as exc:
        return Entry.failed(item.job.src, exc)
    return Entry.written(item.job.src, item.job.dst, result)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        with _LOCK:  # two writer threads add to the same stage
            seconds[stage] += time.perf_counter() - start
