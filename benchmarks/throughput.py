"""Whole photos per second: the 0.3.0 path (one photo at a time, each stage after the other) against
the streaming pipeline, in one run, on the same folder of real multi-face photos.

    python benchmarks/throughput.py [--weights PATH] [--repeat 2] [--threads 2] [--ray] [PHOTOS ...]

Default photos: ../shared/faces/whole, examples/photos and ../shared/faces/obama/raw_photos. Imports
and model loading are excluded; each path runs ``--repeat`` times and the best run is kept. Columns:
photos/s, faces/s, seconds in each stage (read and find faces; the model; colours, paste-back and
writing) and the share of the wall time in which the model was working. The 0.3.0 path is kept here
for the comparison: every face embedded and the colour low-pass at full size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dmdnet_plugin.colours import SIGMA  # noqa: E402
from dmdnet_plugin.factory import load_restorer  # noqa: E402
from dmdnet_plugin.io import IMAGE_EXTENSIONS, list_images, read_image, write_image  # noqa: E402
from dmdnet_plugin.pipeline import Mode, Restorer  # noqa: E402
from dmdnet_plugin.stream import PhotoJob, PhotoStream, StreamOptions  # noqa: E402

SHARED = ROOT.parent / "shared" / "faces"
DEFAULT = [SHARED / "whole", ROOT / "examples" / "photos", SHARED / "obama" / "raw_photos"]


def old_path(restorer: Restorer, photos: list[Path], out: Path) -> dict:
    """0.3.0's `dmdnet restore`: per photo, detect (embedding every face), restore, full-size colour
    low-pass, paste, write."""
    seconds = {"read": 0.0, "model": 0.0, "write": 0.0}
    faces = 0
    for src in photos:
        t0 = time.perf_counter()
        picture = read_image(src)
        detections = restorer.helper.find([picture], embed=True)
        t1 = time.perf_counter()
        restored = restorer.restore_faces(detections, Mode.AUTO, ())[0]
        t2 = time.perf_counter()
        old = []
        for f in restored:
            low = cv2.GaussianBlur(f.restored, (0, 0), SIGMA) - cv2.GaussianBlur(f.crop, (0, 0), SIGMA)
            old.append((f.face, np.clip(f.restored - low, 0, 1).astype(np.float32)))
        pixels, alpha = restorer.helper.paste(picture, old)
        write_image(out / src.name, pixels, alpha)
        t3 = time.perf_counter()
        seconds["read"] += t1 - t0
        seconds["model"] += t2 - t1
        seconds["write"] += t3 - t2
        faces += len(restored)
    return {"seconds": seconds, "faces": faces}


def new_path(stream: PhotoStream, photos: list[Path], out: Path) -> dict:
    stream.seconds = dict.fromkeys(stream.seconds, 0.0)
    entries = list(stream.run([PhotoJob(src, out / src.name) for src in photos]))
    return {"seconds": stream.seconds, "faces": sum(len(e.get("faces", [])) for e in entries)}


def ray_path(photos: list[Path], out: Path, weights: str | None, precision: str) -> dict:
    """`dmdnet restore --ray` on a Ray started here: its actors' start (model loading) is included."""
    from dmdnet_plugin.cluster import restore_on_ray
    from dmdnet_plugin.factory import RestorerSpec

    jobs = [PhotoJob(src, out / src.name) for src in photos]
    entries = list(restore_on_ray(jobs, StreamOptions(), RestorerSpec(weights, precision)))
    return {"seconds": None, "faces": sum(len(e.get("faces", [])) for e in entries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="*", help="photos or folders (default: the shared whole photos and examples)")
    parser.add_argument("--weights", help="checkpoint (default: the discovery order, e.g. the bundled demo)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--copies",
        type=int,
        default=3,
        help="the folder this many times (steady state: the pipeline's start is a small part)",
    )
    parser.add_argument("--ray", action="store_true", help="add rows for Ray Data on this machine (the [ray] extra)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = list_images([p for p in (args.photos or DEFAULT) if Path(p).exists()], IMAGE_EXTENSIONS)
    copies = Path(tempfile.mkdtemp(prefix="dmdnet_bench_"))
    photos = []
    for k in range(args.copies):  # distinct names: each copy is its own output
        for src in found:
            photos.append(copies / f"{k}_{src.name}")
            photos[-1].symlink_to(src.resolve())
    rows = []
    for label, precision, workers in (
        ("0.3.0 path: one photo at a time", "fp32", None),
        ("stream, no threads (--workers 0)", "fp32", 0),
        ("stream (--workers 2)", "fp32", 2),
        ("0.3.0 path: one photo at a time", "auto", None),
        ("stream, no threads (--workers 0)", "auto", 0),
        ("stream (--workers 2)", "auto", 2),
    ):
        restorer = load_restorer(args.weights, device="cpu", precision=precision)
        with (
            PhotoStream(restorer, StreamOptions(), workers=workers or 0) as stream,
            tempfile.TemporaryDirectory() as warm,
        ):
            if workers is not None:  # the threads and the model warmed up before the clock
                list(stream.run([PhotoJob(photos[0], Path(warm) / photos[0].name)]))
            best = None
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    measured = (
                        old_path(restorer, photos, Path(out))
                        if workers is None
                        else new_path(stream, photos, Path(out))
                    )
                    measured["wall"] = time.perf_counter() - start
                best = measured if best is None or measured["wall"] < best["wall"] else best
        rows.append((label, str(restorer.loaded.dtype).removeprefix("torch."), best))
    if args.ray:
        import ray

        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level="WARNING")
        for precision in ("fp32", "auto"):
            best = None
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    measured = ray_path(photos, Path(out), args.weights, precision)
                    measured["wall"] = time.perf_counter() - start
                best = measured if best is None or measured["wall"] < best["wall"] else best
            dtype = rows[0 if precision == "fp32" else 3][1]  # what the same precision ran in above
            rows.append(("Ray Data on this machine (--ray), actors' start included", dtype, best))
    base = rows[0][2]["wall"]
    print(
        f"{len(photos)} photos ({len(found)} x {args.copies}), {rows[0][2]['faces']} faces; "
        f"{restorer.loaded.notice().splitlines()[0]}; {args.threads} torch threads\n"
    )
    print(
        "| path | precision | photos/s | faces/s | read + find faces, s | model, s | colours + paste + write, s "
        "| model busy | vs 0.3.0 fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, dtype, m in rows:
        s = m["seconds"]
        stages = (
            f"{s['read']:.1f} | {s['model']:.1f} | {s['write']:.1f} | {s['model'] / m['wall']:.0%}"
            if s
            else "- | - | - | -"  # Ray's stages run in other processes
        )
        print(
            f"| {label} | {dtype} | {len(photos) / m['wall']:.2f} | {m['faces'] / m['wall']:.2f} | {stages} "
            f"| {base / m['wall']:.2f}x |"
        )


if __name__ == "__main__":
    main()
