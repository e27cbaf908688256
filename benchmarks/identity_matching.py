"""Identity matching: right, wrong and unmatched decisions per degradation level.

    python benchmarks/identity_matching.py [--faces ../shared/faces] [--weights CKPT] [--sweep]

Leave-one-out over every identity folder of the shared faces (CelebRef-HQ people and obama):
each face is degraded (none, moderate, severe: the training degradations at fixed strengths) and
matched against the mean embeddings (clean and under :mod:`dmdnet_plugin.damage`) of that person's
*other* photos and of every other person, with the pipeline's rule (:func:`decide_face`).
The real low-quality obama crops are matched against every identity too, and so are the faces
of people with no folder (../shared/faces/hq), as strangers. Each case is decided
twice: from the degraded face's dlib embedding, and from the embedding of its generic restoration
by the loaded model ("restore, then match"). Prints one table per rule; ``--sweep`` also prints
the wrong/right counts over a grid of threshold and margin, which is how the defaults were chosen.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from basicsr_arch.dmdnet_dataset import DMDNetFaceDataset  # noqa: E402
from dmdnet_plugin.damage import damaged_embedding  # noqa: E402
from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.faces import DlibBackend  # noqa: E402
from dmdnet_plugin.io import read_image, to_uint8  # noqa: E402
from dmdnet_plugin.matching import DEFAULT_MARGIN, DEFAULT_THRESHOLD, decide_face  # noqa: E402
from dmdnet_plugin.weights import load_model  # noqa: E402

LEVELS = {  # the training degradations (DMDNetFaceDataset.degrade) at fixed strengths
    "none": None,
    "moderate": {
        "blur_sigma": [3, 3.01],
        "downsample_range": [4, 4.01],
        "noise_range": [10, 10.01],
        "jpeg_range": [70, 71],
    },
    "severe": {
        "blur_sigma": [6, 6.01],
        "downsample_range": [8, 8.01],
        "noise_range": [20, 20.01],
        "jpeg_range": [40, 41],
    },
}


@dataclass
class Case:
    person: str  # the right answer
    level: str
    raw: np.ndarray | None  # embedding of the face as given
    restored: np.ndarray | None  # embedding of its generic restoration


def people(root: Path) -> dict[str, list[Path]]:
    """Identity -> aligned photos: the CelebRef-HQ folders and the obama references."""
    out = {
        p.name: sorted(p.glob("*.png")) + sorted(p.glob("*.jpg"))
        for p in sorted((root / "celebref" / "refs").iterdir())
    }
    out["obama"] = sorted((root / "obama" / "refs").glob("*.png"))
    return {k: v for k, v in out.items() if len(v) >= 2}


def embed_pair(helper: FaceHelper, model, rgb: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(embedding of the aligned face, embedding of its generic restoration), same landmarks."""
    face = helper.align_whole(rgb)
    lq = torch.from_numpy(face.crop).permute(2, 0, 1)[None] * 2 - 1
    out = model.restore(lq, face.boxes[None])[0].permute(1, 2, 0).cpu().numpy() * 0.5 + 0.5
    landmarks = face.face.landmarks * (512 / np.array(rgb.shape[1::-1]))
    return face.face.embedding, helper.backend.embed(to_uint8(np.clip(out, 0, 1)), landmarks)


def reference_embeddings(helper: FaceHelper, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(clean, damaged) embedding of one reference photo, as an identity dictionary keeps them."""
    face = helper.align_whole(read_image(path).rgb())
    return face.face.embedding, damaged_embedding(helper.backend, face.crop, face.crop_landmarks)


def collect(
    folks: dict[str, list[Path]], real_lq: dict[str, list[Path]], weights: str | None, others: list[Path] = ()
) -> tuple[list[Case], dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """Every case's embeddings (as given and restored), and every person's reference embeddings.

    ``others``: photos of people with no identity folder, degraded like the rest; any match of
    theirs is wrong (their cases have the person "")."""
    model = load_model(weights, device="cpu").net
    helper = FaceHelper(DlibBackend("hog"))
    refs = {name: [reference_embeddings(helper, p) for p in paths] for name, paths in folks.items()}
    photos = [(f"{name}#{i}", i, path) for name, paths in folks.items() for i, path in enumerate(paths)]
    photos += [("", i, path) for i, path in enumerate(others)]
    cases = []
    for level, ranges in LEVELS.items():
        data = DMDNetFaceDataset(
            {"phase": "val", "dataroot_gt": str(next(iter(folks.values()))[0].parent), "num_refs": 0, **(ranges or {})}
        )
        for person, i, path in photos:
            rgb = read_image(path).rgb()
            if ranges is not None:
                random.seed(i)
                np.random.seed(zlib.crc32((person or path.name).encode()))
                rgb = data.degrade(np.ascontiguousarray(rgb.astype(np.float32)))[0]
            raw, restored = embed_pair(helper, model, rgb)
            cases.append(Case(person, level, raw, restored))
    for name, paths in real_lq.items():
        for path in paths:
            raw, restored = embed_pair(helper, model, read_image(path).rgb())
            cases.append(Case(name, "real low quality", raw, restored))
    return cases, refs


def means_for(case: Case, refs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every person's mean embeddings (clean, damaged); the case's own photo is left out of its person's."""
    person, _, index = case.person.partition("#")
    out = {}
    for name, embs in refs.items():
        keep = [
            e for j, e in enumerate(embs) if e[0] is not None and not (name == person and index and j == int(index))
        ]
        out[name] = tuple(np.mean([e[k] for e in keep], axis=0) for k in (0, 1))
    return out


def outcome(case: Case, refs, use: str, threshold: float, margin: float, stranger: bool = False) -> str:
    """right, wrong or unmatched; ``stranger``: the person's own identity is not offered, so any
    match is wrong (a face of someone without a dictionary, in a photo with people who have one).
    A face of someone with no folder at all (person "") is always a stranger."""
    means = means_for(case, refs)
    if stranger:
        means.pop(case.person.partition("#")[0], None)
    embedding = case.raw if use == "raw" else case.restored
    if embedding is None:
        return "unmatched"
    names = list(means)
    distances, damaged = ([float(np.linalg.norm(embedding - means[n][k])) for n in names] for k in (0, 1))
    chosen, _ = decide_face(distances, damaged, threshold, margin)
    if chosen is None:
        return "unmatched"
    return "right" if names[chosen] == case.person.partition("#")[0] else "wrong"


def counts(cases: list[Case], refs, use: str, threshold: float, margin: float) -> dict[str, list[str]]:
    """Level -> the outcome of each of its cases; "stranger, LEVEL" rows offer everyone but the person,
    and hold the faces of people without a folder."""
    out = {
        lv: [outcome(c, refs, use, threshold, margin) for c in cases if c.level == lv and c.person]
        for lv in [*LEVELS, "real low quality"]
    }
    for lv in LEVELS:
        out[f"stranger, {lv}"] = [
            outcome(c, refs, use, threshold, margin, stranger=True) for c in cases if c.level == lv
        ]
    return out


def table(cases: list[Case], refs, use: str, threshold: float, margin: float) -> str:
    lines = [
        f"rule: {use} embedding, threshold {threshold}, margin {margin}",
        "| level | faces | right | wrong | unmatched |",
        "|---|---|---|---|---|",
    ]
    for level, got in counts(cases, refs, use, threshold, margin).items():
        n = len(got)
        if not n:
            continue
        lines.append(
            f"| {level} | {n} | "
            + " | ".join(f"{got.count(k)} ({100 * got.count(k) / n:.0f}%)" for k in ("right", "wrong", "unmatched"))
            + " |"
        )
    return "\n".join(lines)


def sweep(cases: list[Case], refs) -> str:
    lines = [
        "| rule | threshold | margin | wrong (none/moderate/severe) | right (none/moderate/severe) "
        "| strangers matched (none/moderate/severe) |",
        "|---|---|---|---|---|---|",
    ]
    for use in ("raw", "restored"):
        for threshold in (0.5, 0.52, 0.55, 0.6):
            for margin in (0.0, 0.04, 0.05, 0.08):
                got = counts(cases, refs, use, threshold, margin)
                wrong = "/".join(str(got[lv].count("wrong")) for lv in LEVELS)
                right = "/".join(f"{100 * got[lv].count('right') / len(got[lv]):.0f}%" for lv in LEVELS)
                strangers = "/".join(str(got[f"stranger, {lv}"].count("wrong")) for lv in LEVELS)
                lines.append(f"| {use} | {threshold} | {margin} | {wrong} | {right} | {strangers} |")
    return "\n".join(lines)


def _vector(v: np.ndarray | None) -> list | None:
    return None if v is None else [float(x) for x in v]


def save_cache(path: Path, cases: list[Case], refs) -> None:
    """Plain JSON (never a pickle), so a cache file cannot run code."""
    path.write_text(
        json.dumps(
            {
                "cases": [[c.person, c.level, _vector(c.raw), _vector(c.restored)] for c in cases],
                "references": {k: [[_vector(e) for e in pair] for pair in v] for k, v in refs.items()},
            }
        )
    )


def load_cache(path: Path) -> tuple[list[Case], dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    data = json.loads(path.read_text())

    def arr(v):
        return None if v is None else np.array(v)

    return (
        [Case(p, lv, arr(r), arr(x)) for p, lv, r, x in data["cases"]],
        {k: [tuple(arr(e) for e in pair) for pair in v] for k, v in data["references"].items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=Path("../shared/faces"))
    parser.add_argument("--weights", help="checkpoint for restore-then-match (default: discovery order)")
    parser.add_argument("--sweep", action="store_true", help="also print a grid of threshold x margin")
    parser.add_argument("--cache", type=Path, help="keep the embeddings in this JSON file and reuse them")
    args = parser.parse_args()
    if args.cache and args.cache.exists():
        cases, refs = load_cache(args.cache)
    else:
        others = sorted((args.faces / "hq").rglob("*.jpg")) + sorted((args.faces / "hq").rglob("*.png"))
        cases, refs = collect(
            people(args.faces),
            {"obama": sorted((args.faces / "obama" / "lq_crops").glob("*.png"))},
            args.weights,
            others,
        )
        if args.cache:
            save_cache(args.cache, cases, refs)
    print(f"{sum(map(len, refs.values()))} photos of {len(refs)} people; {len(cases)} cases")
    for use in ("raw", "restored"):
        print(table(cases, refs, use, DEFAULT_THRESHOLD, DEFAULT_MARGIN), "\n")
    if args.sweep:
        print(sweep(cases, refs))


if __name__ == "__main__":
    main()
