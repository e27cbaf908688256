"""``make demo``: restore the bundled example photos, generic and with a bundled identity.

Writes demo_output/<photo>_before_after.png (input | generic | with the identity), the
identity dictionary built from examples/refs/obama, and the example clip restored tracked.
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .io import list_images, read_image, write_image
from .pipeline import Restorer
from .video import restore_video
from .weights import WeightsError, load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _labelled(pixels: np.ndarray, label: str) -> np.ndarray:
    rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    rgb = rgb.copy()  # never draw on the photo itself
    cv2.putText(rgb, label, (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2, cv2.LINE_AA)
    return rgb


def main(out_dir: str = "demo_output") -> int:
    try:
        model = load_model()
    except WeightsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(model.weights_source.notice(), file=sys.stderr)
    out = Path(out_dir)
    restorer = Restorer(model)
    identity, _ = restorer.build_identity(list_images([EXAMPLES / "refs" / "obama"]), name="obama")
    identity.save(out / "obama.safetensors")
    for path in list_images([EXAMPLES / "photos"]):
        picture = read_image(path)
        detections = restorer.helper.find([picture])
        panels = [_labelled(picture.pixels, "input")]
        for label, identities in (("generic", ()), ("identity", (identity,))):
            result = restorer.run([picture], identities=identities, detections=detections)[0]
            names = sorted({f.identity.name for f in result.faces if f.identity is not None})
            panels.append(_labelled(result.pixels, label + (f" ({', '.join(names)})" if names else "")))
        write_image(out / f"{path.stem}_before_after.png", np.hstack(panels))
        print(f"{out / (path.stem + '_before_after.png')}: {len(result.faces)} face(s)", file=sys.stderr)
    for clip in sorted((EXAMPLES / "video").glob("*.mp4")):
        report = restore_video(restorer, clip, out / clip.name, identities=[identity])
        people = ", ".join(f"track {t['track']}: frames {t['frames'][0]}-{t['frames'][1]}, {t['identity'] or 'generic'}"
                           for t in report["tracks"])
        print(f"{out / clip.name}: {report['frames']} frames ({people})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
