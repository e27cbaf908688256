"""Faces/s and peak memory of DMDNet.restore against the authors-style reference path.

    python benchmarks/bench_model.py [--batches 1 4 16] [--threads 2] [--repeat 3] [--weights PATH]

"authors-style" is benchmarks/reference_path.py run as the authors' script runs, with glibc's
default allocator; "authors-style+malloc" is the same with our allocator tuning
(dmdnet_plugin/runtime.py), to show how much of the speed-up comes from each part.
Each configuration runs in a fresh subprocess so that its peak memory is its own (CPU:
peak RSS; CUDA: peak allocated). Speed does not depend on the weights' values, so without
--weights a seeded random model of the official size is used.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reference_path import reference_restore  # noqa: E402

from dmdnet_plugin import DMDNet, load_model  # noqa: E402
from dmdnet_plugin.runtime import tune_cpu_allocator  # noqa: E402

BOXES = [[140, 175, 238, 273], [265, 169, 370, 273], [229, 268, 285, 325], [202, 312, 311, 421]]
JITTER = 6  # faces in a batch get different boxes, as in real photos


def run_one(cfg: dict) -> dict:
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cpu" and cfg["path"] != "authors-style":
        tune_cpu_allocator()  # the authors' script runs with glibc's defaults
    torch.manual_seed(0)
    net = load_model(cfg["weights"], device=device).net if cfg["weights"] else DMDNet().to(device).eval()
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg["dtype"]]
    b = cfg["batch"]
    lq = torch.rand(b, 3, 512, 512) * 2 - 1
    boxes = torch.tensor(BOXES).repeat(b, 1, 1) + (torch.arange(b) % 3 * JITTER - JITTER).view(b, 1, 1)
    identity = (
        net.encode_identity(torch.rand(3, 3, 512, 512) * 2 - 1, torch.tensor(BOXES).repeat(3, 1, 1), dtype=dtype)
        if cfg["mode"] == "identity"
        else None
    )
    restore = (
        (lambda *a: net.restore(*a, dtype=dtype)) if cfg["path"] == "ours" else (lambda *a: reference_restore(net, *a))
    )

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        restore(lq, boxes, identity)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed()  # warm-up: weight folding, kernel selection, first touch of the heap
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(timed() for _ in range(cfg["repeat"]))
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {**cfg, "faces_per_s": b / seconds, "s_per_face": seconds / b, "peak_mib": peak / 2**20}


def configs(args) -> list[dict]:
    out = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        dtypes = ["fp32", "fp16"] + (["bf16"] if device == "cpu" else [])
        for batch in args.batches:
            for mode in ("generic", "identity"):
                base = {
                    "device": device,
                    "batch": batch,
                    "mode": mode,
                    "threads": args.threads,
                    "repeat": args.repeat,
                    "weights": args.weights,
                }
                out.append({**base, "path": "authors-style", "dtype": "fp32"})
                if device == "cpu":
                    out.append({**base, "path": "authors-style+malloc", "dtype": "fp32"})
                out += [
                    {**base, "path": "ours", "dtype": d}
                    for d in dtypes
                    if not (device == "cpu" and d == "fp16" and batch > args.cpu_fp16_max_batch)
                ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--weights", default=None)
    parser.add_argument(
        "--cpu-fp16-max-batch",
        type=int,
        default=1,
        help="CPU fp16 has no native kernels on most CPUs; larger batches take very long",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads, CUDA: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
    )
    header = "| device | batch | mode | path | dtype | faces/s | s/face | vs authors-style fp32 | peak MiB |"
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    baseline: dict[tuple, float] = {}
    for cfg in configs(args):
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
        if proc.returncode:
            print(
                f"| {cfg['device']} | {cfg['batch']} | {cfg['mode']} | {cfg['path']} | {cfg['dtype']} | failed: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode} | | | |"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        key = (r["device"], r["batch"], r["mode"])
        if r["path"] == "authors-style":
            baseline[key] = r["faces_per_s"]
        speedup = r["faces_per_s"] / baseline[key] if key in baseline else float("nan")
        print(
            f"| {r['device']} | {r['batch']} | {r['mode']} | {r['path']} | {r['dtype']} | {r['faces_per_s']:.3f} "
            f"| {r['s_per_face']:.2f} | {speedup:.2f}x | {r['peak_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
