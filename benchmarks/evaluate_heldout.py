"""Quality on held-out identities: input vs generic vs reference-based restoration.

    python benchmarks/evaluate_heldout.py --weights CKPT [--opt options/dmdnet_demo.yml] [--limit N]

Uses the validation set of the option file (deterministic degradation, references of the same
person, the target excluded) and prints a table of PSNR, SSIM and the dlib identity distance
between each output and its ground truth (lower is more the same person).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402
from basicsr.utils import tensor2img  # noqa: E402

from basicsr_arch.dmdnet_dataset import DMDNetFaceDataset  # noqa: E402
from dmdnet_plugin.components import sanitize_boxes  # noqa: E402
from dmdnet_plugin.faces import DlibBackend  # noqa: E402
from dmdnet_plugin.weights import load_model  # noqa: E402


def identity_distance(backend: DlibBackend, bgr: np.ndarray, gt_embedding: np.ndarray) -> float:
    """Embedding distance to the ground truth; the face is found on the output itself."""
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    faces = backend.detect(rgb)
    return float(np.linalg.norm(faces[0].embedding - gt_embedding)) if faces else float("nan")


def evaluate(weights: str, opt_path: str, limit: int | None = None) -> dict[str, dict[str, float]]:
    opt = yaml.safe_load(Path(opt_path).read_text())["datasets"]["val"]
    dataset = DMDNetFaceDataset({**opt, "phase": "val"})
    model = load_model(weights, device="cuda" if torch.cuda.is_available() else "cpu")
    backend = DlibBackend("hog")
    rows: dict[str, list[tuple[float, float, float]]] = {"input": [], "generic": [], "reference-based": []}
    for index in range(min(len(dataset), limit or len(dataset))):
        item = dataset[index]
        lq, boxes = item["lq"][None], sanitize_boxes(item["boxes"][None])
        gt = tensor2img(item["gt"], min_max=(-1, 1))
        gt_faces = backend.detect(np.ascontiguousarray(gt[..., ::-1]))
        if not gt_faces:
            continue
        refs = item["refs"][None] if item.get("has_refs", False) else None
        with model._inference() as device:
            out_g, out_s = model(lq.to(device).contiguous(memory_format=torch.channels_last), boxes.to(device),
                                 generic=True, refs=None if refs is None else refs.to(device),
                                 ref_boxes=None if refs is None else sanitize_boxes(item["ref_boxes"][None]).to(device))
        for name, img in (("input", item["lq"]), ("generic", out_g[0]), ("reference-based", None if out_s is None else out_s[0])):
            if img is None:
                continue
            bgr = tensor2img(img.float().cpu(), min_max=(-1, 1))
            rows[name].append((calculate_psnr(bgr, gt, 0), calculate_ssim(bgr, gt, 0),
                               identity_distance(backend, bgr, gt_faces[0].embedding)))
    return {name: dict(zip(("psnr", "ssim", "identity_distance"), np.nanmean(np.array(r), axis=0).tolist()),
                       n=len(r)) for name, r in rows.items() if r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--opt", default="options/dmdnet_demo.yml")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    results = evaluate(args.weights, args.opt, args.limit)
    print("| output | faces | PSNR | SSIM | identity distance |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['n']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['identity_distance']:.3f} |")


if __name__ == "__main__":
    main()
