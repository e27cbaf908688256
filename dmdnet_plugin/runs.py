"""A run: files and folders restored into a folder, resumable, with a report. One value in the core.

:func:`restore_files` is what ``dmdnet restore`` calls (the CLI is its arguments and this call)
and what a Python caller calls: it plans every output before any work (:mod:`outputs`), takes
the output folder's lock and keeps the journal (:mod:`journal`), hands the inputs still to do to
an engine, and writes the report (:mod:`report`). Every engine has one interface, ``restore(jobs,
done)`` yielding report entries and calling ``done(entry)`` as each output is written:
:class:`LocalEngine` (the photo stream, then the videos, on this machine) and
:class:`~dmdnet_plugin.cluster.RayEngine` (Ray Data).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .clips import ClipStatus
from .journal import Files, Journal, LocalFiles, same_name
from .outputs import Job, Plan, local_inputs, plan_jobs
from .pipeline import Restorer
from .report import Entry, RunReport
from .settings import RunSettings
from .stream import Done, PhotoStream
from .text import printable
from .userfiles import BrokenLink, open_regular, unreadable, write_target
from .video import INPUT_EXTENSIONS, is_video, restore_video_job


class Engine(Protocol):
    """Restores a run's inputs: on this machine, or on a cluster."""

    name: str
    settings: RunSettings
    files: Files  # how the run looks at inputs and outputs (local files, or the cluster's storage)

    def plan(self, inputs: Sequence[str], output: str) -> Plan: ...

    def restore(self, jobs: Sequence[Job], done: Done) -> Iterator[Entry]:
        """The entries of ``jobs`` as they finish; ``done(entry)`` as soon as each output is written."""
        ...


class LocalEngine:
    """This machine: the photos through the photo stream (``workers`` threads around the model; 0:
    one stage after the other), then each video. ``clip_progress(src, status)``: a video's frames."""

    name = "stream"

    def __init__(
        self,
        settings: RunSettings,
        workers: int = 2,
        restorer: Restorer | None = None,
        clip_progress: Callable[[str, ClipStatus], None] | None = None,
    ) -> None:
        self.settings, self.workers, self.clip_progress = settings, workers, clip_progress
        self.restorer = restorer or settings.restorer()
        self.files = LocalFiles()

    def plan(self, inputs: Sequence[str], output: str) -> Plan:
        found = local_inputs(inputs, output, INPUT_EXTENSIONS)
        return plan_jobs(
            found, lambda relative: str(Path(output) / relative), INPUT_EXTENSIONS, self.settings.save_faces
        )

    def restore(self, jobs: Sequence[Job], done: Done) -> Iterator[Entry]:
        with PhotoStream(self.restorer, self.settings, self.workers) as stream:
            yield from stream.run((job for job in jobs if not is_video(job.src)), done)
        for job in (job for job in jobs if is_video(job.src)):
            progress = None
            if self.clip_progress is not None:

                def progress(status: ClipStatus, src: str = job.src) -> None:
                    self.clip_progress(src, status)

            entry = restore_video_job(self.restorer, job, self.settings, progress)
            done(entry)
            yield entry


@dataclass(frozen=True)
class RunStart:
    """What a run found before it restored anything (for its first lines)."""

    inputs: int
    kept: int  # finished by an earlier run, and still as they were
    again: int  # finished by an earlier run, restored again: the input changed or the output is gone
    refused: tuple[Entry, ...]  # refused before any work (outputs that would collide)


def restore_files(
    inputs: Sequence[str | Path],
    output: str | Path,
    settings: RunSettings | None = None,
    *,
    engine: Engine | None = None,
    resume: bool = True,
    report: str | Path | None = None,
    on_start: Callable[[RunStart], None] | None = None,
    on_entry: Callable[[Entry], None] | None = None,
) -> RunReport:
    """Restore photos and videos (files, or folders searched recursively) into ``output``.

    Sub-folders are kept below ``output``. With ``resume``, the inputs an earlier run into the same
    folder with the same settings finished are kept if nothing changed since (:mod:`journal`).
    ``engine``: how (default: :class:`LocalEngine` with ``settings``, or :meth:`RunSettings.create`'s
    defaults). ``report``: also write the report there (JSON). ``on_start`` and ``on_entry``: told
    what the run found, and of each entry as it comes. Raises ValueError when no input is found,
    :class:`~dmdnet_plugin.journal.RunLockedError` when another run writes into ``output``.
    """
    engine = engine or LocalEngine(settings or RunSettings.create())
    inputs, output = [str(i) for i in inputs], str(output)
    _check_names(inputs, output)
    plan = engine.plan(inputs, output)
    if not plan.inputs:
        raise ValueError("no input images or videos found")
    target = _report_target(str(report), plan) if report else None
    results = {entry.input: entry for entry in plan.refused}
    refused = list(plan.refused)
    with Journal(output, engine.settings.key(), engine.files, resume) as journal:
        todo, again = [], 0
        for job in plan.jobs:
            resumed = journal.resumed(job.src, job.dst)
            if resumed.entry is not None:
                results[job.src] = resumed.entry
            elif journal.foreign(job.dst):
                refused.append(Entry.failed(job.src, _foreign(job)))
                results[job.src] = refused[-1]
            else:
                todo.append(job)
                again += resumed.again is not None
        if on_start:
            kept = len(plan.jobs) - len(todo) - (len(refused) - len(plan.refused))
            on_start(RunStart(len(plan.inputs), kept, again, tuple(refused)))
        journal.claim([job.src for job in todo], [job.dst for job in todo])
        for entry in engine.restore(todo, journal.add):
            results[entry.input] = entry
            if on_entry:
                on_entry(entry)
    warnings = () if journal.problem is None else (journal.problem,)
    done = RunReport(engine.settings, tuple(results[src] for src in plan.inputs), engine.name, warnings)
    if target:
        try:
            done.write(target)
        except OSError as exc:  # the outputs are written and in the journal: a rerun only writes the report
            raise ValueError(
                f"{printable(report)}: cannot write the report ({exc.strerror or type(exc).__name__})"
            ) from None
    return done


def _foreign(job: Job) -> str:
    """Why a job whose output is already a file of the user's is refused."""
    if same_name(job.src) == same_name(job.dst):
        return f"{job.src}: the output would overwrite the input; choose another output folder (-o)"
    return (
        f"{job.src}: its output {job.dst} is a file this project did not write (the folder's journal does not "
        "name it), and it is never overwritten: move it away, or choose another output folder"
    )


def _check_names(inputs: list[str], output: str) -> None:
    """Names no run can use: an empty one (an unset variable in a script) would mean the current folder."""
    if "" in inputs or not output:
        raise ValueError("an input or the output folder is an empty name")
    if "://" not in output and os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"{printable(output)}: is a file, not a folder; the output must be a folder")


def _report_target(report: str, plan: Plan) -> str:
    """Where the report is written. It never replaces an input, an output, or a file that is not an
    earlier report. A link is written through (replacing the link would leave its target stale); a
    link to nothing, or a loop, is refused."""
    shown = printable(report)
    try:
        target = write_target(report)
    except BrokenLink as exc:
        raise ValueError(f"{shown}: {exc.strerror}") from None
    if same_name(target) in {same_name(n) for n in plan.inputs} | {same_name(j.dst) for j in plan.jobs}:
        raise ValueError(f"{shown}: the report would overwrite an input or an output")
    try:
        with open_regular(target) as f:
            head = f.read(4096)
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise ValueError(f"{shown}: {unreadable(exc)}; --report names a file") from None
    if b'"format": "dmdnet-report"' not in head and not head.startswith(b'{\n  "weights":'):
        raise ValueError(f"{shown}: exists and is not a dmdnet report; it is not overwritten")
    return target
