"""``make demo``: restore the bundled example photos, generic and with a bundled identity.

Writes demo_output/<photo>_before_after.png (input | generic | with the identity),
<photo>_faces.png (the same three, close up on each face: in a group photo the faces are too
small to judge at full size), the identity dictionary built from examples/refs/obama, and the
example clip restored tracked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .factory import load_restorer
from .io import list_images, read_image, write_image
from .video import restore_video
from .weights import WeightsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _labelled(pixels: np.ndarray, label: str) -> np.ndarray:
    rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    rgb = rgb.copy()  # never draw on the photo itself
    cv2.putText(rgb, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
    return rgb


def _close_ups(panels: list[np.ndarray], boxes: list[np.ndarray], size: int = 256) -> np.ndarray:
    """One row per face: the square around its box, 1.6x its size, cut from each panel alike."""
    height, width = panels[0].shape[:2]
    rows = []
    for x1, y1, x2, y2 in boxes:
        half = 0.8 * max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(max(cx - half, 0)), int(max(cy - half, 0))
        right, bottom = int(min(cx + half, width)), int(min(cy + half, height))
        rows.append(
            np.hstack(
                [cv2.resize(p[top:bottom, left:right], (size, size), interpolation=cv2.INTER_CUBIC) for p in panels]
            )
        )
    return np.vstack(rows)


def main(out_dir: str = "demo_output") -> int:
    try:
        restorer = load_restorer()
    except WeightsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(restorer.loaded.notice(), file=sys.stderr)
    out = Path(out_dir)
    identity, _ = restorer.build_identity(list_images([EXAMPLES / "refs" / "obama"]), name="obama")
    identity.save(out / "obama.safetensors")
    for path in list_images([EXAMPLES / "photos"]):
        picture = read_image(path)
        generic, with_identity = restorer.compare(picture, identities=[identity])
        names = sorted({f.identity.name for f in with_identity.faces if f.identity is not None})
        pictures = [picture.pixels, generic.pixels, with_identity.pixels]
        labels = ["input", "generic", "identity" + (f" ({', '.join(names)})" if names else "")]
        write_image(
            out / f"{path.stem}_before_after.png",
            np.hstack([_labelled(p, label) for p, label in zip(pictures, labels)]),
        )
        if with_identity.faces:
            write_image(out / f"{path.stem}_faces.png", _close_ups(pictures, [f.face.box for f in with_identity.faces]))
        print(f"{out / (path.stem + '_before_after.png')}: {len(with_identity.faces)} face(s)", file=sys.stderr)
    for clip in sorted((EXAMPLES / "video").glob("*.mp4")):
        record = restore_video(restorer, clip, out / clip.name, identities=[identity])
        people = ", ".join(
            f"track {t['track']}: frames {t['frames'][0]}-{t['frames'][1]}, {t['identity'] or 'generic'}"
            for t in record.tracks
        )
        print(f"{out / clip.name}: {record.frames} frames ({people})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
