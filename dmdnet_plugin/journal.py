"""Runs that resume: what an earlier run into the same folder finished, and whether it still holds.

A run keeps a journal in the cache folder (``journal_path``: one per output folder, so the output
folder holds only outputs): one JSON line per finished input, written by the thread that wrote the
output, right after it. Each line holds the settings' key, the report entry, the input as it was
(size, mtime_ns and, where cheap, its sha256) and the output as written (size, mtime_ns). Started
again, a run keeps an earlier output only if the settings are the same, the input is unchanged,
and the output is still there, not empty, and either as written or still decodable. A lock on the
output folder stops a second run into it while one is going, and a run's start removes the
temporary files of the killed runs the journal names (:func:`atomic.leftovers`), nothing else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .atomic import TOKEN, leftovers
from .io import ImageError, read_image
from .report import Entry, Status
from .runtime import cache_dir
from .text import printable

HASHED = 256 << 20  # inputs up to this size are hashed whole; larger ones (videos) by their ends


class RunLockedError(RuntimeError):
    """Another run is writing into the same output folder."""


@dataclass(frozen=True)
class Stamp:
    """A file as it was: size, modification time and (inputs, where cheap) content."""

    size: int
    mtime_ns: int
    sha256: str | None = None


class Files(Protocol):
    """How a run looks at its inputs and outputs: local files, or a cluster's storage."""

    def stamp(self, name: str, content: bool) -> Stamp | None: ...

    def usable(self, name: str, written: Stamp) -> bool: ...

    def remove_leftovers(self, folder: str, tokens: set[str]) -> None: ...


class LocalFiles:
    """Files on this machine."""

    def stamp(self, name: str, content: bool) -> Stamp | None:
        try:
            info = os.stat(name)
            return Stamp(info.st_size, info.st_mtime_ns, _sha256(name, info.st_size) if content else None)
        except OSError:
            return None

    def usable(self, name: str, written: Stamp) -> bool:
        """Still a whole output: as written, or changed but still decodable (a user's edit is kept)."""
        now = self.stamp(name, content=False)
        if now is None or now.size == 0:
            return False
        if (now.size, now.mtime_ns) == (written.size, written.mtime_ns):
            return True
        from .video import VideoError, is_video, probe

        try:
            probe(name) if is_video(name) else read_image(name)
        except (ImageError, VideoError):
            return False
        return True

    def remove_leftovers(self, folder: str, tokens: set[str]) -> None:
        if os.path.isdir(folder):
            for path in leftovers(folder, tokens):
                path.unlink(missing_ok=True)


def _sha256(name: str, size: int) -> str:
    """The file's sha256; above :data:`HASHED` bytes, of its size and first and last MiB."""
    sha = hashlib.sha256()
    with open(name, "rb") as f:
        if size <= HASHED:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        else:
            sha.update(str(size).encode() + f.read(1 << 20))
            f.seek(-(1 << 20), 2)
            sha.update(f.read())
    return sha.hexdigest()


def journal_path(folder: str | Path) -> Path:
    """Where the journal of the runs into ``folder`` (a local folder or a URI) is kept."""
    where = str(folder) if "://" in str(folder) else os.path.realpath(folder)
    key = hashlib.sha256(where.encode()).hexdigest()[:16]
    return cache_dir() / "runs" / f"{key}.jsonl"


@dataclass(frozen=True)
class Record:
    """A journal line: a finished input, and its input and output as they were then."""

    entry: Entry
    input: Stamp
    output: Stamp | None

    def to_json(self, settings: str) -> str:
        output = None if self.output is None else asdict(self.output)
        record = {"settings": settings, "entry": self.entry.to_json(), "input": asdict(self.input), "output": output}
        return json.dumps(record)


@dataclass(frozen=True)
class Resumed:
    """An input as a resumed run finds it: its earlier entry if that still holds, else why not."""

    entry: Entry | None
    again: str | None = None  # why an input an earlier run finished is restored again


class Journal:
    """The finished inputs of the runs into one output folder with the same settings (``key``).

    Used as a context manager: entering takes the folder's lock, removes what killed runs left
    and starts this run's journal; ``add`` (from any thread) records each output as it is written.
    """

    def __init__(self, folder: str, key: str, files: Files, resume: bool = True) -> None:
        self.folder, self.key, self.files, self.resume = folder, key, files, resume
        self.path = journal_path(folder)
        self.records: dict[str, Record] = {}
        self.started: dict[str, Stamp | None] = {}  # the inputs of this run, as they were at its start
        self._lock = threading.Lock()
        self._file = None
        self._held = None

    # ------------------------------------------------------------ start and end
    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._held = open(self.path.with_suffix(".lock"), "a+")
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._held.seek(0)
            pid = self._held.read().strip() or "?"
            self._held.close()
            raise RunLockedError(
                f"another dmdnet run (process {pid}) is writing into {printable(self.folder)}; "
                "wait for it to end, or choose another output folder"
            ) from None
        self._held.truncate(0)
        self._held.write(str(os.getpid()))
        self._held.flush()
        tokens = self._read()
        self.files.remove_leftovers(self.folder, tokens - {TOKEN})
        lines = [json.dumps({"run": TOKEN, "settings": self.key})]
        lines += [r.to_json(self.key) for r in self.records.values()]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in lines))  # this run's settings only
        tmp.replace(self.path)
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._held.close()  # and the lock with it

    def _read(self) -> set[str]:
        """Load the records of these settings; the tokens of every run the journal names."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return set()
        tokens = set()
        for line in lines:
            try:
                record = json.loads(line)
                if "run" in record:
                    tokens.add(str(record["run"]))
                elif self.resume and record.get("settings") == self.key:
                    output = None if record["output"] is None else Stamp(**record["output"])
                    entry = Entry.from_json(record["entry"])
                    self.records[entry.input] = Record(entry, Stamp(**record["input"]), output)
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # the line a kill cut short, or an older format
        return tokens

    # ------------------------------------------------------------ resuming
    def resumed(self, src: str, dst: str) -> Resumed:
        """The entry of an input an earlier run finished, if it still holds for ``dst``."""
        record = self.records.get(src)
        if record is None or record.entry.status is Status.ERROR or record.entry.output != dst:
            return Resumed(None)  # never finished, failed (tried again), or now has another output
        if self.files.stamp(src, content=record.input.sha256 is not None) != record.input:
            return Resumed(None, "its input changed")
        if record.output is None or not self.files.usable(dst, record.output):
            return Resumed(None, "its output is gone, empty or broken")
        return Resumed(record.entry)

    def begin(self, sources: list[str]) -> None:
        """Note this run's inputs as they are now: one that changes before its output is journaled
        is not journaled (its output may be of either version), so the next run restores it again."""
        self.started = {src: self.files.stamp(src, content=False) for src in sources}

    def add(self, entry: Entry) -> None:
        """Record a finished input (from any thread: the stream's writers call it)."""
        before = self.started.get(entry.input)
        now = self.files.stamp(entry.input, content=True)
        if before is None or now is None or (now.size, now.mtime_ns) != (before.size, before.mtime_ns):
            return
        output = None if entry.output is None else self.files.stamp(entry.output, content=False)
        with self._lock:
            self._file.write(Record(entry, now, output).to_json(self.key) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
