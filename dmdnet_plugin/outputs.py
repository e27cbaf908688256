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

from .journal import same_name
from .report import Entry

FACE_FOLDERS = ("cropped_faces", "restored_faces")  # where --save-faces writes, beside each output


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


def plan_jobs(
    found: Iterable[Found], join: Callable[[PurePath], str], extensions: set[str], save_faces: bool = False
) -> Plan:
    """The jobs of ``found`` (``join``: a relative path -> its output). An input given twice (under
    any spelling) is restored once. Refused, one line each: a file given by a name without one of
    ``extensions`` (its output keeps its name, so its format: ``photo.gif`` or ``noext`` could only fail
    after its restoration), two inputs with one output, an output that another output needs as its
    folder, and with ``save_faces`` (crops named by the photo's folder and stem:
    ``cropped_faces/img_00.png``) two photos whose crops would share names, or a photo that lies in a
    crops folder itself."""
    inputs: list[str] = []
    outputs: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    unknown: set[str] = set()
    for item in found:
        dst = join(item.relative)
        if (same_name(item.src), dst) not in seen:
            seen.add((same_name(item.src), dst))
            inputs.append(item.src)
            if item.relative.suffix.lower() in extensions:
                outputs[item.src] = dst
            else:
                unknown.add(item.src)
    claims: dict[str, list[str]] = {}
    for src, dst in outputs.items():
        path = PurePath(dst)
        names = [dst, *(str(parent) for parent in path.parents)]
        if save_faces:
            names.append(str(path.parent / FACE_FOLDERS[0] / path.stem))
        for name in dict.fromkeys(names):
            claims.setdefault(name, []).append(src)
    clash = {src: others for name, others in claims.items() if _clashes(name, others, outputs) for src in others}
    if save_faces:
        clash.update({src: [src] for src, dst in outputs.items() if set(PurePath(dst).parts) & set(FACE_FOLDERS)})
    names = ", ".join(sorted(extensions))
    why = {src: f"{src}: not a photo or video name (its output keeps it; it must end in {names})" for src in unknown}
    why |= {src: _why(src, clash[src], outputs) for src in clash}
    refused = tuple(Entry.failed(src, why[src]) for src in inputs if src in why)
    jobs = tuple(Job(src, outputs[src]) for src in inputs if src not in why)
    return Plan(tuple(inputs), jobs, refused)


def _clashes(name: str, sources: list[str], outputs: dict[str, str]) -> bool:
    """Whether a name claimed by several ``sources`` cannot be theirs at once: an output of one (and
    the output, or a folder it needs, of another), or the face crops of two photos."""
    if len(sources) < 2:
        return False
    return any(outputs[s] == name for s in sources) or PurePath(name).parent.name == FACE_FOLDERS[0]


def _why(src: str, others: list[str], outputs: dict[str, str]) -> str:
    other = next((s for s in others if s != src), None)
    if other is None:
        return f"{src}: lies in a {' or '.join(FACE_FOLDERS)} folder, where --save-faces writes its face crops"
    if outputs[src] != outputs[other] and PurePath(outputs[src]).stem == PurePath(outputs[other]).stem:
        return f"{src}: its face crops (--save-faces) would have the same names as {other}'s; rename one"
    return (
        f"{src}: would have the same output as {other} ({outputs[src]} and {outputs[other]} cannot both be "
        "written); rename one, or restore them into different folders"
    )
