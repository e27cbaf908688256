"""A folder of photos through the Restorer with the model kept busy, and runs that resume.

Photos go through three stages: read and find the faces (one thread: dlib is not thread-safe),
restore the faces of a window of photos together (the model, in batches across the photos), then
keep colours, paste back and write (threads). While the model restores one window, the threads
read the next photos and write the last ones, so the model waits for neither. At most a few
windows are held at once, whatever the folder's size. Batches are made from the photos in input
order, ``window`` at a time, the same way with or without threads, so ``workers=0`` (one stage
after the other, the reference path) gives the same pixels and report.

A run keeps a journal (``journal_path``: in the cache folder, one per output folder, so the output
folder holds only outputs): one line per finished input, written after the output itself
(outputs are written atomically). Started again with the same settings, after a
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .face_helper import Detection, FaceHelper
from .identity import IdentityError
from .io import ImageError, Picture, read_image, refuse_overwrite, write_image
from .pipeline import FRAMES_PER_RUN, Mode, Restorer, checked_mode, chunks, needs_embeddings, save_faces
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


Prepared = tuple[PhotoJob, Picture, Detection] | tuple[PhotoJob, Exception]


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
            return _read(job, self.restorer.helper, self.options.aligned, self.embed)

    def _timed_read(self, job: PhotoJob) -> tuple[Prepared, float]:
        start = time.perf_counter()
        return _read(job, self.restorer.helper, self.options.aligned, self.embed), time.perf_counter() - start

    def _finish(self, job: PhotoJob, picture: Picture, detection: Detection, faces: tuple) -> dict:
        """Colours, paste-back and the atomic write of one photo; its report entry (thread-safe)."""
        with _timed(self.seconds, "write"):
            return self._write(job, picture, detection, faces)

    def _write(self, job: PhotoJob, picture: Picture, detection: Detection, faces: tuple) -> dict:
        o = self.options
        try:
            result = self.restorer.finish(picture, detection, faces, o.upscale, o.strength, o.keep_colours)
            write_image(job.dst, result.pixels, result.alpha)
            if o.save_faces:
                save_faces(result, job.dst.parent, job.src.stem)
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

    def _restore_window(self, window: list[Prepared]) -> list[tuple[Prepared, tuple | None]]:
        """The model stage: the faces of every good photo of the window, batched across them."""
        good = [p for p in window if len(p) == 3]
        try:
            with _timed(self.seconds, "model"):
                faces = iter(self.restorer.restore_faces([p[2] for p in good], self.mode, self.identities))
        except Exception as exc:  # the model failed on this window: each of its photos is an error
            return [((p[0], exc), None) if len(p) == 3 else (p, None) for p in window]
        return [(p, next(faces) if len(p) == 3 else None) for p in window]

    # ------------------------------------------------------------------ runs
    def run(self, jobs: Iterable[PhotoJob], done: Callable[[dict], None] | None = None) -> Iterator[dict]:
        """Report entries, in input order, as the photos are written; ``done(entry)`` right after each."""
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

    def _completed(self, item: Prepared, faces: tuple | None) -> dict:
        return error_entry(item[0].src, item[1]) if faces is None else self._finish(*item, faces)

    def _run_inline(self, jobs: Iterable[PhotoJob], done: Callable[[dict], None] | None) -> Iterator[dict]:
        for window in chunks((self._prepare(job) for job in jobs), self.window):
            for item, faces in self._restore_window(window):
                entry = self._completed(item, faces)
                if done:
                    done(entry)
                yield entry

    def _run_overlapped(
        self,
        jobs: Iterable[PhotoJob],
        reader: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        done: Callable[[dict], None] | None,
    ) -> Iterator[dict]:
        ahead: deque[Future] = deque()  # photos being read: at most two windows ahead of the model
        writing: deque[Future] = deque()  # photos being finished, in input order
        jobs = iter(jobs)

        def prepared() -> Iterator[Prepared]:
            for job in jobs:
                ahead.append(reader.submit(self._timed_read, job))
                if len(ahead) >= 2 * self.window:
                    yield self._received(ahead.popleft())
            while ahead:
                yield self._received(ahead.popleft())

        for window in chunks(prepared(), self.window):
            for item, faces in self._restore_window(window):
                writing.append(writer.submit(self._completed, item, faces))
            while len(writing) > self.window:  # bounded: finish the oldest while the model moves on
                entry = writing.popleft().result()
                if done:
                    done(entry)
                yield entry
        while writing:
            entry = writing.popleft().result()
            if done:
                done(entry)
            yield entry


def _read(job: PhotoJob, helper: FaceHelper, aligned: bool, embed: bool) -> Prepared:
    """Read a photo and find its faces; a failure is returned, not raised: the batch goes on."""
    try:
        refuse_overwrite(job.src, job.dst)
        picture = read_image(job.src)
        return job, picture, helper.find([picture], aligned, embed=embed)[0]
    except Exception as exc:
        return job, exc


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        with _LOCK:  # two writer threads add to the same stage
            seconds[stage] += time.perf_counter() - start


def journal_path(folder: Path) -> Path:
    """Where the journal of the runs into ``folder`` is kept."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "runs" / f"{key}.jsonl"


class Journal:
    """The finished inputs of the runs into an output folder with given settings, one JSON line each.

    Appended and flushed after each output is written, so a run killed at any moment leaves at
    worst one partial last line, which is ignored. A journal of other settings is started afresh.
    """

    def __init__(self, folder: Path, settings: dict, resume: bool = True) -> None:
        self.folder, self.path = folder, journal_path(folder)
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.entries: dict[str, dict] = {}
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

    def finished(self, src: Path) -> dict | None:
        """The entry of an input this run already finished, if its output is still there."""
        entry = self.entries.get(str(src))
        if entry is None or entry["status"] == "error" or not Path(entry["output"] or "").is_file():
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
        self.entries[entry["input"]] = entry
        self._file.write(json.dumps({"settings": self.key, "entry": entry}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc) -> None:
        self._file.close()
