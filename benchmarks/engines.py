"""Faces/s of the CPU engines, in one run: torch fp32, torch at ``--precision auto``, onnxruntime and
OpenVINO (fp32, and bf16 where the CPU has it) on the ONNX file of ``dmdnet export-onnx``.

    python benchmarks/engines.py [--batches 1 4] [--rounds 3] [--threads N] [--weights PATH] [--onnx FILE]

Every engine restores the real parity faces (tests/data/lq) with the template boxes the file uses, and is
checked against torch fp32 before it is timed: fp32 engines differ by 1e-3 at most, bf16 ones by a mean
of 1.5e-2 at most (what tests/test_model.py holds ``--precision auto``'s bf16 to). The engines take
turns in every round, each keeping its best time, so that the drift of a shared host reaches them all.
Without ``--weights``, the official-size model with the seeded weights of the parity tests (speed does
not depend on the values). ``--onnx``: a file exported from the same weights (checked by its
fingerprint), instead of exporting one first (about a minute).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from parity_inputs import load_parity_inputs  # noqa: E402
from seeded_weights import seeded_state_dict  # noqa: E402

from dmdnet_plugin import DMDNet, load_model  # noqa: E402
from dmdnet_plugin.align import TEMPLATE_BOXES  # noqa: E402
from dmdnet_plugin.onnx_export import export_onnx  # noqa: E402
from dmdnet_plugin.runtime import pick_precision, precision_name, tune_cpu_allocator  # noqa: E402

FP32_MAX = 1e-3  # largest difference from torch fp32 (tests/test_onnx.py)
BF16_MEAN = 1.5e-2  # mean difference of bf16 (tests/test_model.py)

Engine = Callable[[np.ndarray], np.ndarray]


def official_net(weights: str | None) -> DMDNet:
    """The model the table is about: ``weights``, or the official size with the parity tests' seeded weights."""
    if weights:
        return load_model(weights, device="cpu", precision="fp32").net
    tune_cpu_allocator()  # as load_model does on CPU
    net = DMDNet()
    net.load_state_dict(seeded_state_dict(net))
    return net.eval()


def onnx_file(net: DMDNet, given: str | None, folder: Path) -> Path:
    """The enhancer file of ``net``: ``given`` (when made from the same weights), or a new export."""
    if not given:
        return export_onnx(net, folder / "dmdnet.onnx")
    import onnx

    meta = {p.key: p.value for p in onnx.load(given, load_external_data=False).metadata_props}
    if meta.get("dmdnet.model_fingerprint") != net.fingerprint() or meta.get("dmdnet.boxes") != "FFHQ template":
        sys.exit(f"{given}: not the template file of these weights; export it again")
    return Path(given)


def torch_engine(net: DMDNet, dtype: torch.dtype) -> Engine:
    def run(faces: np.ndarray) -> np.ndarray:
        boxes = np.broadcast_to(TEMPLATE_BOXES, (len(faces), 4, 4)).copy()
        return net.restore(torch.from_numpy(faces), boxes, dtype=dtype).numpy()

    return run


def onnxruntime_engine(path: Path, threads: int) -> Engine:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda faces: session.run(None, {"input": faces})[0]


def openvino_engines(path: Path, threads: int) -> dict[str, tuple[Engine, bool]]:
    """OpenVINO in fp32, and in bf16 where the CPU has it: name -> (engine, is bf16)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    precisions = ["f32"] + (["bf16"] if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else [])
    engines = {}
    for precision in precisions:
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        compiled = core.compile_model(model, "CPU", config)
        engines[f"OpenVINO {precision.replace('f32', 'fp32')}"] = (
            lambda faces, c=compiled: c({0: faces})[c.output(0)],
            precision == "bf16",
        )
    return engines


def check(name: str, out: np.ndarray, expected: np.ndarray, bf16: bool) -> tuple[float, float]:
    """Max and mean difference from torch fp32; stop the run if an engine restores differently."""
    diff = np.abs(out - expected)
    ok = np.isfinite(out).all() and (diff.mean() <= BF16_MEAN if bf16 else diff.max() <= FP32_MAX)
    if not ok:
        sys.exit(f"{name}: differs from torch fp32 (max {diff.max():.2e}, mean {diff.mean():.2e})")
    return float(diff.max()), float(diff.mean())


def measure(engines: dict[str, tuple[Engine, bool]], batches: list[int], rounds: int) -> tuple[dict, dict]:
    """Best seconds and (max, mean) difference from torch fp32 per (engine, batch)."""
    lq = load_parity_inputs()["lq"].numpy()
    faces = {b: np.ascontiguousarray(np.resize(lq, (b, *lq.shape[1:]))) for b in batches}
    expected = {b: engines["torch fp32"][0](x) for b, x in faces.items()}
    diffs = {
        (name, b): check(name, engine(x), expected[b], bf16)  # also each engine's warm-up at this batch
        for name, (engine, bf16) in engines.items()
        for b, x in faces.items()
    }
    best = dict.fromkeys(diffs, float("inf"))
    for _ in range(rounds):
        for b, x in faces.items():
            for name, (engine, _bf16) in engines.items():
                start = time.perf_counter()
                engine(x)
                best[name, b] = min(best[name, b], time.perf_counter() - start)
    return best, diffs


def machine() -> str:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    import onnxruntime
    import openvino

    return (
        f"{model}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--weights", help="a checkpoint (default: the official size with seeded weights)")
    parser.add_argument("--onnx", help="the template file of these weights, from `dmdnet export-onnx`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = official_net(args.weights)
    auto = pick_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        path = onnx_file(net, args.onnx, Path(folder))
        engines = {
            "torch fp32": (torch_engine(net, torch.float32), False),
            f"torch auto ({precision_name(auto)})": (torch_engine(net, auto), auto == torch.bfloat16),
            "onnxruntime fp32": (onnxruntime_engine(path, args.threads), False),
            **openvino_engines(path, args.threads),
        }
        best, diffs = measure(engines, args.batches, args.rounds)
    print(f"{machine()}; {args.threads} threads, best of {args.rounds} rounds")
    print("| engine | batch | faces/s | s/face | vs torch's best | max diff | mean diff |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batches:
        torch_best = min(s for (name, batch), s in best.items() if batch == b and name.startswith("torch"))
        for name in engines:
            s = best[name, b]
            top, mean = diffs[name, b]
            print(f"| {name} | {b} | {b / s:.3f} | {s / b:.2f} | {torch_best / s:.2f}x | {top:.1e} | {mean:.1e} |")


if __name__ == "__main__":
    main()
