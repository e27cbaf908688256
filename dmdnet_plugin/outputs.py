"""Where each input's output goes, decided for the whole run before any work.

Inputs found in a folder keep their path below it, as ``cp -r`` and rsync do, so
``in/2019/img.jpg`` and ``in/2020/img.jpg`` become ``out/2019/img.jpg`` and ``out/2020/img.jpg``;
a file given by itself goes to ``out/<its name>``. Two inputs that would still share an output
(two files of the same name given from two folders, or photos whose ``--save-faces`` crops would
share names) are both refused, one line each, and the others go on. The output folder is never
searched for inputs, so a run into a folder inside its inputs does not restore its own outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from .report import Entry


@dataclass(frozen=True)
class Job:
    """One input and where its output goes, as the user names them (paths, or URIs on a cluster)."""

    src: str
    dst: str


@dataclass(frozen=True)
class Found:
    """An input and its path below the folder it was found in (its name, when given by itself)."""

    src: str
    relative: PurePath


@dataclass(frozen=True)
class Plan:
    """A run's inputs in order: those to restore, and those refused before any work."""

    inputs: tuple[str, ...]
    jobs: tuple[Job, ...]
    refused: tuple[Entry, ...]


def local_inputs(inputs: Sequence[str | Path], output: str | Path, extensions: set[str]) -> list[Found]:
    """Files given, and the files with ``extensions`` found (sorted, recursively) in folders given,
    leaving out an output folder that lies inside one of them (its outputs are not inputs)."""
    out = os.path.realpath(output)
    found: list[Found] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(Found(str(item), PurePath(item.name)))
            continue
        below = _inside(out, os.path.realpath(item)) and out != os.path.realpath(item)
        for path in sorted(item.rglob("*")):
            if path.suffix.lower() in extensions and path.is_file():
                if not (below and _inside(os.path.realpath(path), out)):
                    found.append(Found(str(path), path.relative_to(item)))
    return found


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def plan_jobs(found: Iterable[Found], join: Callable[[PurePath], str], save_faces: bool = False) -> Plan:
    """The jobs of ``found`` (``join``: a relative path -> its output). An input given twice is
    restored once. ``save_faces``: face crops are named by the photo's folder and stem
    (``cropped_faces/img_00.png``), so those must differ too."""
    inputs: list[str] = []
    outputs: dict[str, str] = {}
    for item in found:
        if item.src not in outputs:
            inputs.append(item.src)
            outputs[item.src] = join(item.relative)
    claims: dict[str, list[str]] = {}
    for src, dst in outputs.items():
        names = [dst] + ([str(PurePath(dst).parent / f"faces of {PurePath(dst).stem}")] if save_faces else [])
        for name in names:
            claims.setdefault(name, []).append(src)
    clash = {src: others for others in claims.values() if len(others) > 1 for src in others}
    refused = tuple(
        Entry.failed(
            src,
            f"{src}: would have the same output as {_other(clash[src], src)} ({outputs[src]}); rename "
            "one, or restore them into different folders",
        )
        for src in inputs
        if src in clash
    )
    jobs = tuple(Job(src, outputs[src]) for src in inputs if src not in clash)
    return Plan(tuple(inputs), jobs, refused)


def _other(sources: list[str], src: str) -> str:
    return next(s for s in sources if s != src)
