"""Runs that resume: what an earlier run into the same folder finished, and whether it still holds.

A run keeps a journal in the cache folder (``journal_path``: one per output folder, so the output
folder holds only outputs). It names the outputs the project wrote there (a file in the folder
that it does not name is the user's, never overwritten), and has one JSON line per finished input,
written by the thread that wrote the output, right after it: the settings' key, the report entry,
the input as it was (size, mtime_ns and, where cheap, its sha256) and the output as written (size,
mtime_ns). Started again, a run keeps an earlier output only if the settings are the same, the
input is unchanged and the output is still exactly as written. A lock on the output folder stops
a second run into it while one is going, and a run's start removes the temporary files of the
killed runs the journal names (:func:`atomic.leftovers`), nothing else.
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

from .atomic import TOKEN, atomic_path, leftovers
from .report import Entry, Status
from .runtime import cache_dir
from .text import printable
from .userfiles import open_regular

HASHED = 256 << 20  # inputs up to this size are hashed whole; larger ones (videos) by their ends


class RunLockedError(RuntimeError):
    """Another run is writing into the same output folder."""


class JournalError(RuntimeError):
    """The journal (in the cache folder) cannot be kept: a run without it could not resume or know its outputs."""


@dataclass(frozen=True)
class Stamp:
    """A file as it was: size, modification time and (inputs, where cheap) content."""

    size: int
    mtime_ns: int
    sha256: str | None = None


class Files(Protocol):
    """How a run looks at its inputs and outputs: local files, or a cluster's storage."""

    def stamp(self, name: str, content: bool) -> Stamp | None: ...

    def remove_leftovers(self, folder: str, tokens: set[str]) -> None: ...


class LocalFiles:
    """Files on this machine."""

    def stamp(self, name: str, content: bool) -> Stamp | None:
        try:
            info = os.stat(name)
            return Stamp(info.st_size, info.st_mtime_ns, _sha256(name, info.st_size) if content else None)
        except OSError:
            return None

    def remove_leftovers(self, folder: str, tokens: set[str]) -> None:
        if os.path.isdir(folder):
            for path in leftovers(folder, tokens):
                path.unlink(missing_ok=True)


def _sha256(name: str, size: int) -> str:
    """The file's sha256; above :data:`HASHED` bytes, of its size and first and last MiB."""
    sha = hashlib.sha256()
    with open_regular(name) as f:  # a FIFO put in an input's place must not hang the run
        if size <= HASHED:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        else:
            sha.update(str(size).encode() + f.read(1 << 20))
            f.seek(-(1 << 20), 2)
            sha.update(f.read())
    return sha.hexdigest()


def same_name(name: str) -> str:
    """One spelling of a file's name (``in/../in/a.jpg``, a link's path and the real path are one file)."""
    return name if "://" in name else os.path.realpath(name)


def journal_path(folder: str | Path) -> Path:
    """Where the journal of the runs into ``folder`` (a local folder or a URI) is kept."""
    key = hashlib.sha256(same_name(str(folder)).encode()).hexdigest()[:16]
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
    """The outputs the project wrote into one output folder, and the finished inputs of the runs
    into it with the same settings (``key``).

    Used as a context manager: entering takes the folder's lock, removes what killed runs left and
    starts this run's journal; ``claim`` names the outputs this run will write; ``add`` (from any
    thread) records each output as it is written. A journal that cannot be written is a
    :class:`JournalError` at the start; during the run, ``problem`` says what stopped it, and the
    run goes on (its outputs are still written; a resumed run restores them again).
    """

    def __init__(self, folder: str, key: str, files: Files, resume: bool = True) -> None:
        self.folder, self.key, self.files, self.resume = folder, key, files, resume
        self.path = journal_path(folder)
        self.records: dict[str, Record] = {}  # by the input's one name (:func:`same_name`)
        self.others: list[str] = []  # the lines of other settings, kept as they were
        self.owned: set[str] = set()  # the outputs the project wrote here, by their one name
        self.started: dict[str, Stamp | None] = {}  # the inputs of this run, as they were at its start
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._file = None
        self._held: int | None = None

    # ------------------------------------------------------------ start and end
    def __enter__(self) -> Journal:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
            tokens = self._read()
            self.files.remove_leftovers(self.folder, tokens - {TOKEN})
            lines = [json.dumps({"run": TOKEN, "settings": self.key})]
            lines += [json.dumps({"owned": name}) for name in sorted(self.owned)]
            lines += self.others + [r.to_json(self.key) for r in self.records.values()]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in lines))
            self._file = open(self.path, "a")
        except OSError as exc:
            self._release()
            raise JournalError(
                f"cannot keep the run's journal in {printable(self.path.parent)} ({exc.strerror or exc}); "
                "set DMDNET_CACHE to a writable folder"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._file.close()
        except OSError as error:  # a full disk on the last write
            self._stopped(error)
        self._release()

    def _take_lock(self) -> None:
        """The folder's lock: a file beside the journal, never followed through a link."""
        lock = self.path.with_suffix(".lock")
        self._held = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self._held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self._held, 32, 0).decode(errors="replace").strip() or "?"
            self._release()
            raise RunLockedError(
                f"another dmdnet run (process {printable(pid)}) is writing into {printable(self.folder)}; "
                "wait for it to end, or choose another output folder"
            ) from None
        os.ftruncate(self._held, 0)
        os.pwrite(self._held, str(os.getpid()).encode(), 0)

    def _release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # and the lock with it
            self._held = None

    def _read(self) -> set[str]:
        """Load what the journal says: the records of these settings, the other lines, the outputs
        written here; returns the tokens of every run it names."""
        try:
            with open_regular(self.path) as f:  # a FIFO there (a shared cache) would hang the run
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return set()
        tokens = set()
        for line in lines:
            try:
                record = json.loads(line)
                if "run" in record:
                    tokens.add(str(record["run"]))
                elif "owned" in record:
                    self.owned.add(str(record["owned"]))
                else:
                    self._entry_line(record, line)
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # the line a kill cut short, a byte gone wrong, or an older format
        return tokens

    def _entry_line(self, record: dict, line: str) -> None:
        entry = Entry.from_json(record["entry"])
        if entry.output:
            self.owned.add(same_name(entry.output))
        if record.get("settings") != self.key:
            self.others.append(line)
        elif self.resume:
            output = None if record["output"] is None else Stamp(**record["output"])
            self.records[same_name(entry.input)] = Record(entry, Stamp(**record["input"]), output)

    def _stopped(self, error: OSError) -> None:
        if self.problem is None:
            self.problem = (
                f"the journal in {printable(self.path.parent)} could not be written ({error.strerror or error}): "
                "a resumed run will restore the inputs it misses again"
            )

    # ------------------------------------------------------------ resuming
    def resumed(self, src: str, dst: str) -> Resumed:
        """The entry of an input an earlier run finished, if it still holds for ``dst``."""
        record = self.records.get(same_name(src))
        if record is None or record.entry.status is Status.ERROR or record.entry.output is None:
            return Resumed(None)  # never finished, or failed (tried again)
        if same_name(record.entry.output) != same_name(dst):
            return Resumed(None)  # it now has another output
        if self.files.stamp(src, content=record.input.sha256 is not None) != record.input:
            return Resumed(None, "its input changed")
        now = self.files.stamp(dst, content=False)
        if record.output is None or now is None or now.size == 0 or now != record.output:
            return Resumed(None, "its output is gone or changed")
        return Resumed(record.entry.renamed(src, dst))

    def foreign(self, dst: str) -> bool:
        """Whether ``dst`` is a file the project did not write here (the user's: never overwritten)."""
        return same_name(dst) not in self.owned and self.files.stamp(dst, content=False) is not None

    def claim(self, sources: list[str], outputs: list[str]) -> None:
        """Name the outputs this run will write (so that one a kill leaves is known as the project's),
        and note its inputs as they are now: one that changes before its output is journaled is not
        journaled (its output may be of either version), so the next run restores it again."""
        self.started = {same_name(src): self.files.stamp(src, content=False) for src in sources}
        names = [same_name(dst) for dst in outputs]
        self.owned.update(names)
        self._write("".join(json.dumps({"owned": name}) + "\n" for name in names))

    def add(self, entry: Entry) -> None:
        """Record a finished input (from any thread: the stream's writers call it)."""
        before = self.started.get(same_name(entry.input))
        now = self.files.stamp(entry.input, content=True)
        if before is None or now is None or (now.size, now.mtime_ns) != (before.size, before.mtime_ns):
            return
        output = None if entry.output is None else self.files.stamp(entry.output, content=False)
        self._write(Record(entry, now, output).to_json(self.key) + "\n", sync=True)

    def _write(self, text: str, sync: bool = False) -> None:
        with self._lock:
            if self.problem is not None:
                return
            try:
                self._file.write(text)
                self._file.flush()
                if sync:
                    os.fsync(self._file.fileno())
            except OSError as error:
                self._stopped(error)
