"""Measure the identity-matching threshold (dmdnet_plugin.pipeline.DEFAULT_THRESHOLD).

    python benchmarks/measure_identity_threshold.py [../shared/faces]

Every reference of every identity (celebref, obama) is matched, leave-one-out, against the
mean dlib embedding of each identity's other references: the same-person distances must fall
below the threshold and the different-person ones above it. Prints both distributions and the
accuracy of candidate thresholds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dmdnet_plugin.faces import DlibBackend  # noqa: E402


def embeddings(folder: Path, backend: DlibBackend) -> list[np.ndarray]:
    out = []
    for path in sorted(folder.glob("*.png")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        faces = backend.detect(rgb)
        if faces:
            out.append(faces[0].embedding)
    return out


def main(root: Path) -> None:
    backend = DlibBackend("hog")
    people = {p.name: embeddings(p, backend) for p in sorted((root / "celebref" / "refs").iterdir())}
    people["obama"] = embeddings(root / "obama" / "refs", backend)
    same, diff = [], []
    for name, embs in people.items():
        for i, e in enumerate(embs):
            rest = np.stack(embs[:i] + embs[i + 1 :]).mean(0)
            same.append(np.linalg.norm(e - rest))
            diff += [np.linalg.norm(e - np.stack(o).mean(0)) for n, o in people.items() if n != name]
    same, diff = np.array(same), np.array(diff)
    print(f"{sum(map(len, people.values()))} references of {len(people)} people")
    print(f"same person:      n={len(same)} max={same.max():.3f} p95={np.percentile(same, 95):.3f} mean={same.mean():.3f}")
    print(f"different people: n={len(diff)} min={diff.min():.3f} p5={np.percentile(diff, 5):.3f} mean={diff.mean():.3f}")
    print("| threshold | same accepted | different rejected |\n|---|---|---|")
    for t in np.arange(0.40, 0.66, 0.025):
        print(f"| {t:.3f} | {(same <= t).mean():.3f} | {(diff > t).mean():.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/faces"))
