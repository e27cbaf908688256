"""Quality on held-out people: input vs generic vs identity restoration (with their references).

    python benchmarks/evaluate_heldout.py [--weights CKPT] [--opt options/dmdnet_demo.yml] [--limit N] [--grid PNG]

Uses the validation set of the option file (deterministic degradation, references of the same
person, the target excluded) and prints a table of PSNR, SSIM and the dlib identity distance
between each output and its ground truth (lower is more the same person), for the model's own
output and for it with the input's broad colours kept (:mod:`dmdnet_plugin.colours`, the
pipeline's default). Without --weights it evaluates whatever the discovery order finds (the
bundled demo checkpoint on a fresh clone). --grid writes input | generic | identity (as the
pipeline gives them) | ground truth, one row per face, 256 px per face.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402
from basicsr.utils import tensor2img  # noqa: E402

from basicsr_arch.dmdnet_dataset import DMDNetFaceDataset  # noqa: E402
from dmdnet_plugin.colours import keep_colours  # noqa: E402
from dmdnet_plugin.components import sanitize_boxes  # noqa: E402
from dmdnet_plugin.faces import DlibBackend, FaceBackend  # noqa: E402
from dmdnet_plugin.io import to_uint8  # noqa: E402
from dmdnet_plugin.weights import load_model  # noqa: E402

OUTPUTS = ("input", "generic", "identity", "generic, input's colours", "identity, input's colours")
GRID_PANEL = 256  # px per face in the --grid image (half size keeps the docs small)


def identity_distance(backend: FaceBackend, bgr: np.ndarray, gt_embedding: np.ndarray) -> float:
    """Embedding distance to the ground truth; the face is found on the output itself."""
    faces = backend.detect(np.ascontiguousarray(bgr[..., ::-1]))
    return float(np.linalg.norm(faces[0].embedding - gt_embedding)) if faces else float("nan")


def evaluate(
    weights: str | None, val_opt: dict, limit: int | None = None, grid: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Mean PSNR, SSIM and identity distance per output over the faces of ``val_opt``'s dataset."""
    dataset = DMDNetFaceDataset({**val_opt, "phase": "val"})
    model = load_model(weights, device="cuda" if torch.cuda.is_available() else "cpu").net
    backend = DlibBackend("hog")
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in OUTPUTS}
    panels = []
    for index in range(min(len(dataset), limit or len(dataset))):
        item = dataset[index]
        gt = tensor2img(item["gt"], min_max=(-1, 1))
        gt_faces = backend.detect(np.ascontiguousarray(gt[..., ::-1]))
        if not gt_faces or not item.get("has_refs", False):
            continue
        with model._inference() as device:
            out = model(
                item["lq"][None].to(device).contiguous(memory_format=torch.channels_last),
                sanitize_boxes(item["boxes"][None]).to(device),
                generic=True,
                refs=item["refs"][None].to(device),
                ref_boxes=sanitize_boxes(item["ref_boxes"][None]).to(device),
            )
        images = [
            tensor2img(img.float().cpu(), min_max=(-1, 1)) for img in (item["lq"], out.generic[0], out.identity[0])
        ]
        images += [to_uint8(keep_colours(img / 255.0, images[0] / 255.0)) for img in images[1:]]
        for name, bgr in zip(OUTPUTS, images):
            rows[name].append(
                (
                    calculate_psnr(bgr, gt, 0),
                    calculate_ssim(bgr, gt, 0),
                    identity_distance(backend, bgr, gt_faces[0].embedding),
                )
            )
        row = np.hstack([images[0], *images[3:], gt])
        panels.append(cv2.resize(row, (4 * GRID_PANEL, GRID_PANEL), interpolation=cv2.INTER_AREA))
    if grid is not None and panels:
        cv2.imwrite(str(grid), np.vstack(panels))
    return {
        name: dict(zip(("psnr", "ssim", "identity_distance"), np.nanmean(np.array(r), axis=0).tolist()), n=len(r))
        for name, r in rows.items()
        if r
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="checkpoint (default: the discovery order, e.g. the bundled demo)")
    parser.add_argument("--opt", default="options/dmdnet_demo.yml")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--grid", help="write the faces as an image grid here")
    args = parser.parse_args()
    val_opt = yaml.safe_load(Path(args.opt).read_text())["datasets"]["val"]
    results = evaluate(args.weights, val_opt, args.limit, args.grid)
    print("| output | faces | PSNR | SSIM | identity distance |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['n']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['identity_distance']:.3f} |")


if __name__ == "__main__":
    main()
