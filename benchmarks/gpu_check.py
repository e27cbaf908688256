"""Everything a lent CUDA GPU should show, in one call: correctness, speed, whole photos, training.

    python benchmarks/gpu_check.py OUT [--budget 510] [--stages speed,training]   # on the GPU
    python benchmarks/gpu_check.py OUT --stop [--wait S]    # a later call: stop the training, fetch it
    python benchmarks/gpu_check.py OUT --dry-run            # the same, tiny, on the CPU (tests, CI)
    python benchmarks/gpu_check.py gpu_pack/faces --pack    # here: the training faces to carry

Each stage has a deadline inside ``--budget`` seconds, and every row is written to OUT as soon as it
is measured (tables.md, results.json, log.txt): a stage that runs long, or a call killed at its
limit, leaves all that came before. The last stage starts the training detached (its own process
session), so that it runs on after the call; the call copies the newest checkpoint out before it
ends, and ``--stop`` a later one. docs/speed.md, "On a lent GPU", says how to run it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
from parity_inputs import DATA, LQ, LQ_LANDMARKS, boxes_from_file, load_parity_inputs, read_face  # noqa: E402
from reference_path import reference_restore  # noqa: E402
from seeded_weights import seeded_state_dict  # noqa: E402
from throughput import new_path  # noqa: E402

from dmdnet_plugin.align import TEMPLATE_BOXES  # noqa: E402
from dmdnet_plugin.clips import restore_clip  # noqa: E402
from dmdnet_plugin.components import sanitize_boxes  # noqa: E402
from dmdnet_plugin.face_helper import FaceHelper  # noqa: E402
from dmdnet_plugin.faces import Face  # noqa: E402
from dmdnet_plugin.io import read_image  # noqa: E402
from dmdnet_plugin.layers import SNConv2d  # noqa: E402
from dmdnet_plugin.model import DMDNet  # noqa: E402
from dmdnet_plugin.outputs import Job  # noqa: E402
from dmdnet_plugin.pipeline import ImageResult, Mode, Restorer  # noqa: E402
from dmdnet_plugin.settings import RunSettings  # noqa: E402
from dmdnet_plugin.stream import PhotoStream  # noqa: E402
from dmdnet_plugin.weights import BUNDLED, LoadedModel, convert, load_model  # noqa: E402

STAGES = ("environment", "correctness", "pipeline", "speed", "variants", "photos", "onnx", "training")
CAPS_S = {"environment": 30, "correctness": 75, "pipeline": 30, "speed": 90, "variants": 150, "photos": 40, "onnx": 90}
RESERVE_S = 30.0  # kept at the end of the call to copy the checkpoint out
GRACE_S = 20.0  # past the budget the watchdog ends the call (every row is on disk already)
NOMINAL_GFLOP = 378  # one face through the official model, generic
GOAL = (16, "fp16", 600.0)  # batch, precision, faces/s
# mean |difference| allowed (outputs in [-1, 1]) against strict fp32, and between a batch and its faces
# restored one by one; tf32 (torch's CUDA default for fp32 convolutions) has fp16's mantissa
ONNX_TOLERANCE = 1e-3  # largest |difference| of the exported file from torch's fp32 (docs/onnx.md)
TOLERANCE = {"fp32": 1e-5, "tf32": 2e-3, "fp16": 2e-3, "bf16": 1.5e-2}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HELPS = 1.03  # a variant helps when it is this much faster, within the tolerance
PACK = ROOT / "gpu_pack"  # git-ignored, carried: wheels/ and faces/
TRAIN_OPT = ROOT / "options" / "dmdnet_demo_gpu_check.yml"
STATE = ROOT / "experiments" / "gpu_check"  # launch records and console logs (BasicSR never moves this folder)
DRY_NAME = "gpu_check_dry"
HELDOUT = ("00121", "00146")
MAX_FILE = 15 << 20  # a call brings back files of at most 16 MiB
COLUMNS = {  # every table's columns: a row gives their values in this order
    "environment": "item | value",
    "stages": "stage | seconds | status",
    "skipped": "stage | reason",
    "correctness": "model | check | precision | faces | mean abs | max abs | tolerance | ok | note",
    "pipeline": "check | pictures | faces restored | mean levels | max levels | tolerance | ok",
    "flops": "model | path | GFLOP/face | nominal",
    "speed": "batch | precision | path | faces/s | TFLOP/s | peak MiB | vs authors-style fp32",
    "goal": "batch | precision | faces/s | goal | met",
    "variants": "batch | precision | variant | vs restore | mean abs vs fp32 | max abs vs fp32 | within tolerance | "
    "helps | note",
    "photos": "path | precision | photos | faces | photos/s | faces/s | read + find faces, s | model, s | "
    "colours + paste + write, s | model busy",
    "onnx": "provider | faces | max abs vs torch fp32 | tolerance | ok | faces/s | export, s",
    "training": "item | value",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call measures: the real call on a CUDA GPU, or its rehearsal on the CPU."""

    device: str
    budget: float
    ngf: int  # the seeded model: DMDNet() on the GPU, DMDNet(ngf=16, banks_num=8) in the rehearsal
    banks: int
    faces: int  # real faces in the correctness batch
    batches: tuple[int, ...]
    precisions: tuple[str, ...]  # of the speed table
    compare: tuple[str, ...]  # checked against strict fp32
    warmup: int
    repeat: int
    photos: int  # aligned crops restored as whole photos
    copies: int  # of those photos in the throughput run
    train_share: float  # the measuring stages end this long before the budget, so that the training starts
    slack: float  # the stages' caps (CAPS_S, set for the GPU) times this
    demo_checks: bool  # the bundled demo checked as the seeded model is (it runs in the later stages anyway)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


ALL = ("fp32", "fp16", "bf16")
REAL = Plan("cuda", 510, 64, 128, 16, (1, 4, 16, 32), ALL, ("tf32", "fp16", "bf16"), 2, 5, 8, 8, 150, 1, True)
DRY = Plan("cpu", 900, 16, 8, 2, (1, 2), ("fp32", "bf16"), ("bf16",), 0, 1, 2, 1, 200, 4, False)  # shared CPUs: slack


class OutOfTime(Exception):
    """A stage reached its deadline; what it measured is written already."""


class Results:
    """The tables and the log of one call, written out again after every row: a stage cut short, or a
    call killed at its limit, leaves all that was measured before."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.tables: dict[str, list[dict]] = {}
        self.start = time.monotonic()
        self._lock = threading.RLock()  # the watchdog writes from its own thread

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f} s] {message}"
        with self._lock, (self.folder / "log.txt").open("a") as f:
            print(line, flush=True)
            f.write(line + "\n")

    def add(self, table: str, *values: object) -> None:
        """A row of ``table``: its COLUMNS' values in order (the last ones may be left out)."""
        with self._lock:
            self.tables.setdefault(table, []).append(dict(zip(COLUMNS[table].split(" | "), values)))
            self._write("results.json", json.dumps(self.tables, indent=1, default=str))
            self._write("tables.md", self.markdown())

    def skip(self, stage: str, reason: str) -> None:
        self.log(f"{stage}: skipped: {reason}")
        self.add("skipped", stage, reason)

    def markdown(self) -> str:
        parts = []
        for name, rows in self.tables.items():
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines = [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
            parts.append("\n".join(lines))
        return "\n\n".join(parts) + "\n"

    def summary(self) -> str:
        """What to read first (the end of the call's output): each stage, the checks, the goal, the training."""
        lines = [f"{r['stage']}: {r['status']}" for r in self.tables.get("stages", [])]
        checks = (("correctness", "ok"), ("pipeline", "ok"), ("variants", "within tolerance"), ("onnx", "ok"))
        for name, key in checks:
            if rows := self.tables.get(name):
                lines.append(f"{name}: {sum(bool(r[key]) for r in rows)} of {len(rows)} within their tolerance")
        for r in self.tables.get("goal", []):
            lines.append(f"goal: {r['faces/s']:.0f} faces/s at batch {r['batch']} {r['precision']}: met {r['met']}")
        training = {r["item"]: r["value"] for r in self.tables.get("training", [])}
        keep = ("iterations", "checkpoint")
        lines += [f"training, {k}: {_cell(v)}" for k, v in training.items() if k in keep or k.startswith("generic")]
        return "\n".join(lines)

    def _write(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.folder / name)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "/").replace("\n", " ")


def check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise OutOfTime


@dataclasses.dataclass(frozen=True)
class Context:
    """What every stage gets."""

    plan: Plan
    results: Results
    train_opt: Path
    work: Path  # scratch, removed after the call


class NoFaces:
    """A face backend that finds nothing, so that each aligned crop gets the template boxes (``--aligned``
    without landmarks): the lent GPU has no dlib, and its face models are too large to carry."""

    name = "none"

    def detect(self, rgb8: np.ndarray, embed: bool = True) -> list[Face]:
        return []

    def landmarks(self, rgb8: np.ndarray, box: np.ndarray) -> np.ndarray:
        raise LookupError("no face models on this machine")

    def embed(self, rgb8: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        raise LookupError("no face models on this machine")


@functools.cache
def seeded_model(device: str, ngf: int, banks: int) -> DMDNet:
    """tests/seeded_weights.py's weights in a model of this size, built on its device."""
    with torch.device(device):
        net = DMDNet(ngf=ngf, banks_num=banks)
    net.load_state_dict(seeded_state_dict(net))
    return net.eval()


@functools.cache
def demo_model(device: str) -> DMDNet:
    return load_model(BUNDLED, device, "fp32").net


def face_files(count: int) -> list[tuple[Path, Path]]:
    """``count`` real aligned faces of tests/data and the landmark files of their boxes: the parity faces
    first (low quality), then the held-out pairs and the references, repeated as needed."""
    files = [(DATA / face, DATA / marks) for face, marks in zip(LQ, LQ_LANDMARKS)]
    for folder in ("heldout_lq", "heldout", "celebref"):
        found = sorted(p for p in (DATA / folder).rglob("*") if p.suffix in (".jpg", ".png"))
        files += [(p, p.with_name(p.name + ".txt")) for p in found]
    return [files[i % len(files)] for i in range(count)]


@functools.cache
def real_faces(device: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 512, 512) faces in [-1, 1] and (N, 4, 4) boxes from their own landmarks, on ``device``."""
    files = face_files(count)
    lq = torch.stack([read_face(face) for face, _ in files])
    return lq.to(device), torch.from_numpy(np.stack([boxes_from_file(marks) for _, marks in files])).to(device)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 in convolutions and matrix products on or off (cuDNN's is on by default)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def restored(net: DMDNet, precision: str, lq: torch.Tensor, boxes: torch.Tensor, identity=None) -> torch.Tensor:
    """``LoadedModel.restore`` in ``precision``: strict fp32, tf32, fp16 or bf16."""
    with tf32(precision == "tf32"):
        return LoadedModel(net, DTYPES[precision]).restore(lq, boxes, identity)


def measure(run: Callable[[], torch.Tensor], plan: Plan) -> tuple[float, float, torch.Tensor]:
    """Median seconds of ``run`` after the plan's warm-up calls, the peak memory in MiB (CUDA: allocated;
    CPU: the process's peak resident size), and the last output."""
    for _ in range(plan.warmup):
        run()
    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(plan.repeat):
        if plan.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if plan.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if plan.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return statistics.median(times), peak / 2**20, out


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Mean and largest |got - want| (NaN when either is not finite)."""
    diff = (got.float() - want.float()).abs()
    return diff.mean().item(), diff.max().item()


# ------------------------------------------------------------------------------------------------- stages
def stage_environment(ctx: Context, deadline: float) -> None:
    """Versions, the card, and its two ceilings measured here: a bf16 matrix product and a device copy."""
    rows = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "CUDA (torch)": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "TF32 convolutions / matmul (defaults)": f"{torch.backends.cudnn.allow_tf32} / "
        f"{torch.backends.cuda.matmul.allow_tf32}",
        "CPUs": len(os.sched_getaffinity(0)),
        "/dev/shm free, GiB (data loader workers)": shutil.disk_usage("/dev/shm").free / 2**30,
        "budget, s": ctx.plan.budget,
        "basicsr": ensure_basicsr(ctx.results),
        "onnxruntime": onnx_providers(),
    }
    if ctx.plan.cuda:
        props = torch.cuda.get_device_properties(0)
        rows |= {"GPU": props.name, "multiprocessors": props.multi_processor_count}
        rows["memory, GiB"] = props.total_memory / 2**30
        query = "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=20)
        rows["nvidia-smi " + query] = " ".join(smi.stdout.splitlines()[1:]) or smi.stderr.strip()
        a, b = torch.randn(2, 8192, 8192, device="cuda", dtype=torch.bfloat16)
        src = torch.randn(2**28, device="cuda")
        dst = torch.empty_like(src)
        timing = dataclasses.replace(ctx.plan, warmup=3, repeat=10)
        rows["bf16 matmul 8192^3, TFLOP/s"] = 2 * 8192**3 / measure(lambda: a @ b, timing)[0] / 1e12
        rows["device copy, TB/s (read + written)"] = 2 * src.nbytes / measure(lambda: dst.copy_(src), timing)[0] / 1e12
    for item, value in rows.items():
        ctx.results.add("environment", item, value)


def stage_correctness(ctx: Context, deadline: float) -> None:
    """On real faces, for the seeded model and the bundled demo: each precision against strict fp32, a
    batch against its faces one by one, and on CUDA no host sync in restore and no overflow in fp16."""
    plan, results = ctx.plan, ctx.results
    lq, boxes = real_faces(plan.device, plan.faces)
    refs = load_parity_inputs()
    models = {f"seeded, ngf {plan.ngf}": seeded_model(plan.device, plan.ngf, plan.banks)}
    if plan.demo_checks:
        models["demo"] = demo_model(plan.device)
    else:
        results.skip("correctness", "demo: the rehearsal checks the seeded model alone")
    for label, net in models.items():
        identity = net.encode_identity(refs["refs"], refs["ref_boxes"])
        paths = {"generic": None, "identity": identity}
        batch = {}
        for path, ident in paths.items():
            batch[path, "fp32"] = want = restored(net, "fp32", lq, boxes, ident)
            for precision in plan.compare:
                check(deadline)
                batch[path, precision] = restored(net, precision, lq, boxes, ident)
                error_row(results, label, f"{path} vs fp32", precision, batch[path, precision], want)
        for precision in ("fp32", *plan.compare):
            check(deadline)
            singles = torch.cat([restored(net, precision, lq[i : i + 1], boxes[i : i + 1]) for i in range(len(lq))])
            error_row(results, label, "batch vs one by one", precision, batch["generic", precision], singles)
        if not plan.cuda:
            results.skip("correctness", f"{label}: host syncs and fp16 overflows are CUDA checks")
            continue
        for (path, ident), precision in [(p, d) for p in paths.items() for d in ("fp32", "fp16", "bf16")]:
            problem = host_sync(LoadedModel(net, DTYPES[precision]), lq, boxes, ident)
            what, sync = f"{path}: no host sync in restore", "set_sync_debug_mode('error')"
            results.add("correctness", label, what, precision, len(lq), None, None, sync, problem is None, problem)
        for path, ident in paths.items():
            bad = nonfinite_modules(net, functools.partial(restored, net, "fp16", lq, boxes, ident))
            what, note = f"{path}: every module's output finite", ", ".join(bad[:5])
            results.add("correctness", label, what, "fp16", len(lq), None, None, "no inf or NaN", not bad, note)


def error_row(results: Results, model: str, what: str, precision: str, got: torch.Tensor, want: torch.Tensor) -> None:
    mean, peak = errors(got, want)
    tolerance = TOLERANCE[precision]
    results.add(
        "correctness", model, what, precision, len(got), mean, peak, f"mean <= {tolerance:g}", mean <= tolerance
    )


def host_sync(model: LoadedModel, lq: torch.Tensor, boxes: torch.Tensor, identity) -> str | None:
    """None when ``restore`` runs with no host-device synchronisation (inputs on the GPU), else what torch
    said. The first call folds the weights and copies the identity to the GPU, which may sync."""
    model.restore(lq, boxes, identity)
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.restore(lq, boxes, identity)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def nonfinite_modules(net: DMDNet, run: Callable[[], torch.Tensor]) -> list[str]:
    """The modules whose output held an inf or a NaN during ``run`` (the final tanh would hide an overflow
    inside), with one synchronisation at the end rather than one per module."""
    flags: list[tuple[str, torch.Tensor]] = []

    def hook(name: str, _module: torch.nn.Module, _inputs: tuple, output: object) -> None:
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                flags.append((name, torch.isfinite(t).all()))

    handles = [m.register_forward_hook(functools.partial(hook, n)) for n, m in net.named_modules() if n]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    finite = torch.stack([f for _, f in flags]).tolist() if flags else []
    return [name for (name, _), ok in zip(flags, finite) if not ok]


def crops_restorer(device: str, precision: str, batch_size: int = 4) -> Restorer:
    """The demo model behind a face helper that takes each picture as one aligned crop."""
    return Restorer(load_model(BUNDLED, device, precision), FaceHelper(NoFaces()), batch_size=batch_size)


def stage_pipeline(ctx: Context, deadline: float) -> None:
    """Aligned crops as whole photos through ``Restorer.run`` on the device against the CPU in fp32, and
    as a clip through ``restore_clip`` (temporal off: tracking needs landmarks) against the photos."""
    plan = ctx.plan
    precision = "fp16" if plan.cuda else "bf16"
    pictures = [read_image(face) for face, _ in face_files(plan.photos)]
    on_device = crops_restorer(plan.device, precision)
    photos = on_device.run(pictures, Mode.GENERIC, aligned=True)
    check(deadline)
    on_cpu = crops_restorer("cpu", "fp32").run(pictures, Mode.GENERIC, aligned=True)
    levels_row(ctx.results, f"photos, {plan.device} {precision} vs CPU fp32", photos, on_cpu, precision)
    check(deadline)
    found = on_device.helper.find(pictures, aligned=True, embed=False)
    clip = restore_clip(on_device, lambda: pictures, Mode.GENERIC, temporal=False, detections=found)
    levels_row(ctx.results, "clip (restore_clip) vs the same frames as photos", list(clip.results), photos, precision)


def levels_row(results: Results, what: str, got: list[ImageResult], want: list[ImageResult], precision: str) -> None:
    """Pixels of two restorations of the same pictures, in 8-bit levels: the model's tolerance, as levels,
    plus half a level of rounding."""
    diffs = [np.abs(a.pixels.astype(np.int32) - b.pixels.astype(np.int32)) for a, b in zip(got, want)]
    faces = sum(f.restored is not None for r in got for f in r.faces)
    mean = float(np.mean([d.mean() for d in diffs]))
    tolerance = TOLERANCE[precision] * 127.5 + 0.5
    same = len(got) == len(want) == faces and all(a.pixels.shape == b.pixels.shape for a, b in zip(got, want))
    peak = int(max(d.max() for d in diffs))
    results.add("pipeline", what, len(got), faces, mean, peak, f"mean <= {tolerance:.2f}", same and mean <= tolerance)


def stage_speed(ctx: Context, deadline: float) -> None:
    """Faces/s, TFLOP/s and peak memory by batch and precision, against the authors-style path in fp32,
    inputs on the device; the goal's batch first. fp32 is torch's default (on CUDA: TF32 convolutions)."""
    plan = ctx.plan
    net = seeded_model(plan.device, plan.ngf, plan.banks)
    gflop = flops_rows(ctx, net)
    first = GOAL[0] if GOAL[0] in plan.batches else plan.batches[-1]
    for batch in sorted(plan.batches, key=lambda b: b != first):
        lq, boxes = real_faces(plan.device, batch)
        baseline = None
        for path, precision in [("authors-style", "fp32")] + [("restore", p) for p in plan.precisions]:
            check(deadline)
            seconds, peak, _ = measure(speed_run(net, path, DTYPES[precision], lq, boxes), plan)
            rate = batch / seconds
            baseline = baseline or rate
            ctx.results.add("speed", batch, precision, path, rate, rate * gflop / 1e3, peak, rate / baseline)
            if (batch, precision, path) == (*GOAL[:2], "restore"):
                ctx.results.add("goal", batch, precision, rate, GOAL[2], rate >= GOAL[2])


def speed_run(net: DMDNet, path: str, dtype: torch.dtype, lq: torch.Tensor, boxes: torch.Tensor) -> Callable:
    if path == "authors-style":
        return lambda: reference_restore(net, lq, boxes)
    return lambda: LoadedModel(net, dtype).restore(lq, boxes)


def flops_rows(ctx: Context, net: DMDNet) -> float:
    """GFLOP per face of each path by torch's FLOP counter; returns the generic one's."""
    from torch.utils.flop_counter import FlopCounterMode

    lq, boxes = real_faces(ctx.plan.device, 1)
    refs = load_parity_inputs()
    counted = {}
    for path, ident in (("generic", None), ("identity", net.encode_identity(refs["refs"], refs["ref_boxes"]))):
        with FlopCounterMode(display=False) as counter:
            net.restore(lq, boxes, ident)
        counted[path] = counter.get_total_flops() / 1e9
        nominal = NOMINAL_GFLOP if ctx.plan.ngf == 64 else None
        ctx.results.add("flops", f"seeded, ngf {ctx.plan.ngf}", path, counted[path], nominal)
    return counted["generic"]


def stage_variants(ctx: Context, deadline: float) -> None:
    """Ways to run the goal's batch, each timed against ``restore`` and checked against strict fp32."""
    plan = ctx.plan
    net = seeded_model(plan.device, plan.ngf, plan.banks)
    batch = GOAL[0] if plan.cuda else plan.batches[0]
    lq, boxes = real_faces(plan.device, batch)
    want = restored(net, "fp32", lq, boxes)
    for precision in [p for p in ("fp16", "bf16") if p in plan.precisions]:
        base = None
        try:
            for name, run in variant_runs(net, DTYPES[precision], lq, boxes).items():
                check(deadline)
                if name == "cudnn.benchmark":
                    torch.backends.cudnn.benchmark = True  # stays on for the CUDA graph below
                seconds, _, out = measure(run() if name.startswith("CUDA graph") else run, plan)
                base = base or seconds
                variant_row(ctx.results, (batch, precision, name), base / seconds, *errors(out, want))
        finally:
            torch.backends.cudnn.benchmark = False
        if not plan.cuda:
            ctx.results.skip("variants", "cudnn.benchmark, CUDA graphs and torch.compile are CUDA variants")
        elif precision == GOAL[1]:
            compiled_row(ctx, batch, precision, base, deadline)
        else:
            ctx.results.skip("variants", f"torch.compile in {GOAL[1]} only: each compile takes minutes")


def variant_runs(net: DMDNet, dtype: torch.dtype, lq: torch.Tensor, boxes: torch.Tensor) -> dict[str, Callable]:
    """Name -> a call restoring the batch; "CUDA graph" maps to what captures the graph and returns its call."""
    model, on_host = LoadedModel(net, dtype), (lq.cpu(), boxes.cpu())
    runs = {
        "restore (channels_last input)": lambda: model.restore(lq, boxes),
        "restore from host tensors": lambda: model.restore(*on_host),
        "NCHW input": lambda: nchw(net, dtype, lq, boxes),
    }
    if lq.is_cuda:
        runs["cudnn.benchmark"] = runs["restore (channels_last input)"]
        runs["CUDA graph + cudnn.benchmark"] = lambda: graphed(net, dtype, lq, boxes)
    return runs


def variant_row(results: Results, row: tuple, speedup: float, mean: float, peak: float, note: str = "") -> None:
    """``row``: (batch, precision, variant)."""
    within = mean <= TOLERANCE[row[1]]
    results.add("variants", *row, speedup, mean, peak, within, within and speedup >= HELPS, note)


def nchw(net: DMDNet, dtype: torch.dtype, lq: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``restore``'s forward without its channels_last input (the folded weights stay channels_last)."""
    with net._inference(dtype):
        return net(lq.contiguous(), sanitize_boxes(boxes)).generic.float()


def graphed(net: DMDNet, dtype: torch.dtype, lq: torch.Tensor, boxes: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The forward captured once as a CUDA graph for this batch; its call copies the faces into the
    captured input and replays it. Autocast keeps no cast cache (it would outlive the capture)."""
    x, b = lq.contiguous(memory_format=torch.channels_last), sanitize_boxes(boxes)

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype, enabled=dtype != torch.float32, cache_enabled=False):
            return net(x, b).generic.float()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        forward()
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()

    def replay() -> torch.Tensor:
        x.copy_(lq)
        graph.replay()
        return out

    return replay


def compiled_row(ctx: Context, batch: int, precision: str, base: float, deadline: float) -> None:
    """torch.compile in a child process group, so that a compile running past the deadline can be ended
    with its compile workers."""
    seconds = deadline - time.monotonic()
    if seconds < 30:
        ctx.results.skip("variants", f"torch.compile ({precision}): {seconds:.0f} s left in the stage")
        return
    cmd = [sys.executable, __file__, str(ctx.work), "--child", f"compile:{precision}:{batch}"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, **pipes)
    try:
        stdout, stderr = child.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        ctx.results.skip("variants", f"torch.compile ({precision}) did not finish within {seconds:.0f} s")
        return
    ctx.results.log("torch.compile child:\n" + "\n".join(stderr.splitlines()[-20:]))
    if child.returncode:
        ctx.results.skip("variants", f"torch.compile ({precision}) failed: {(stderr or '?').splitlines()[-1]}")
        return
    got = json.loads(stdout.splitlines()[-1])
    note = f"folded convolutions; the first call, compiling, took {got['compile_s']:.0f} s"
    variant_row(ctx.results, (batch, precision, "torch.compile"), base / got["seconds"], got["mean"], got["max"], note)


def compile_child(spec: str) -> dict:
    """``--child compile:PRECISION:BATCH``: the official seeded model under torch.compile, timed, checked."""
    _, precision, batch = spec.split(":")
    net = seeded_model("cuda", REAL.ngf, REAL.banks)
    lq, boxes = real_faces("cuda", int(batch))
    want = restored(net, "fp32", lq, boxes)
    plain = folded_copy(net)
    compiled = torch.compile(plain)
    x, b = lq.contiguous(memory_format=torch.channels_last), sanitize_boxes(boxes)

    def run() -> torch.Tensor:
        with plain._inference(DTYPES[precision]):
            return compiled(x, b).generic.float()

    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    seconds, _, out = measure(run, REAL)
    mean, peak = errors(out, want)
    return {"seconds": seconds, "mean": mean, "max": peak, "compile_s": compile_s}


def folded_copy(net: DMDNet) -> DMDNet:
    """A copy of ``net`` with plain convolutions holding the folded spectral-norm weights: SNConv2d's fold
    cache (keyed by tensor versions) breaks torch.compile's graph at every conv, the copy is one graph."""
    plain = copy.deepcopy(net)
    with torch.no_grad():
        for parent in list(plain.modules()):
            for name, sn in list(parent.named_children()):
                if isinstance(sn, SNConv2d):
                    shape = (sn.in_channels, sn.out_channels, sn.kernel_size, sn.stride, sn.padding, sn.dilation)
                    conv = torch.nn.Conv2d(*shape, sn.groups, sn.bias is not None, device=sn.weight_orig.device)
                    conv.weight = torch.nn.Parameter(sn.normalised_weight().clone())
                    conv.bias = sn.bias
                    setattr(parent, name, conv)
    return plain.eval()


def stage_photos(ctx: Context, deadline: float) -> None:
    """benchmarks/throughput.py's stream with the model on the device, aligned crops as photos (read,
    template boxes, restore, colours, paste, write): without threads, and with two writer threads."""
    plan = ctx.plan
    (ctx.work / "photos").mkdir()
    photos = []
    for k in range(plan.copies):  # distinct names: each copy is its own output
        for face, _ in face_files(plan.photos):
            photos.append(ctx.work / "photos" / f"{k}_{face.parent.name}_{face.name}")
            photos[-1].symlink_to(face)
    settings = RunSettings.create(BUNDLED, plan.device, "auto", mode="generic", aligned=True, batch_size=8)
    restorer = crops_restorer(settings.device, settings.precision, settings.batch_size)
    for workers in (0, 2):
        check(deadline)
        with (
            PhotoStream(restorer, settings, workers=workers) as stream,
            tempfile.TemporaryDirectory() as warm,
            tempfile.TemporaryDirectory() as out,
        ):
            list(stream.run([Job(str(photos[0]), str(Path(warm) / photos[0].name))]))  # warm-up
            start = time.perf_counter()
            measured = new_path(stream, photos, Path(out))
            wall = time.perf_counter() - start
        s = measured["seconds"]
        faces, busy = measured["faces"], f"{s['model'] / wall:.0%}"
        rates = (len(photos), faces, len(photos) / wall, faces / wall, s["read"], s["model"], s["write"], busy)
        ctx.results.add("photos", f"stream (--workers {workers})", settings.precision, *rates)


def stage_onnx(ctx: Context, deadline: float) -> None:
    """The seeded model written by `dmdnet export-onnx` (generic, template boxes) and run in onnxruntime:
    on the GPU in its CUDA provider, in the rehearsal in its CPU provider; the file's output on real faces
    against torch's strict fp32 on the CPU (docs/onnx.md's tolerance), and its faces/s."""
    plan = ctx.plan
    provider = "CUDAExecutionProvider" if plan.cuda else "CPUExecutionProvider"
    try:
        import onnxruntime

        from dmdnet_plugin.onnx_export import export_onnx
    except ImportError as exc:
        ctx.results.skip("onnx", f"the onnx extra is not installed ({exc}): pip install 'dmdnet-plugin[onnx]'")
        return
    if provider not in onnxruntime.get_available_providers():
        reason = f"onnxruntime has no CUDA provider here ({onnx_providers()}): carry an onnxruntime-gpu wheel"
        ctx.results.skip("onnx", reason)
        return
    net = seeded_model("cpu", plan.ngf, plan.banks)
    lq = real_faces("cpu", plan.faces)[0]
    boxes = torch.from_numpy(np.broadcast_to(TEMPLATE_BOXES, (len(lq), 4, 4)).copy())
    start = time.perf_counter()
    path = export_onnx(net, ctx.work / "dmdnet.onnx")
    exported = time.perf_counter() - start
    check(deadline)
    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    seconds, _, got = measure(lambda: torch.from_numpy(session.run(None, {"input": lq.numpy()})[0]), plan)
    _, peak = errors(got, restored(net, "fp32", lq, boxes))
    row = (provider, len(lq), peak, ONNX_TOLERANCE, peak <= ONNX_TOLERANCE, len(lq) / seconds, exported)
    ctx.results.add("onnx", *row)


def onnx_providers() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return f"{onnxruntime.__version__}, providers: " + ", ".join(onnxruntime.get_available_providers())


# ----------------------------------------------------------------------------------------------- training
def ensure_basicsr(results: Results) -> str:
    """BasicSR's version: from the environment, or installed from gpu_pack/wheels into a temporary folder
    (the lent GPU has none and cannot download); the training finds it through PYTHONPATH."""
    with contextlib.suppress(ImportError):
        import basicsr

        return basicsr.__version__
    wheels = sorted((PACK / "wheels").glob("*.whl"))
    if not wheels:
        return "missing: no wheels in gpu_pack/wheels"
    site = Path(tempfile.gettempdir()) / "gpu_check_site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target"]
    proc = subprocess.run([*pip, str(site), *map(str, wheels)], capture_output=True, text=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    try:
        import basicsr
    except ImportError as exc:
        return f"missing: installing {', '.join(w.name for w in wheels)}: {exc} {proc.stderr.strip()[-300:]}"
    results.log(f"basicsr installed from {', '.join(w.name for w in wheels)} into {site}")
    return f"{basicsr.__version__}, from {', '.join(w.name for w in wheels)}"


def training_options(plan: Plan, path: Path) -> dict:
    """The option file as it is, or for the rehearsal the same run on tests/data: two steps of one face,
    validation on the four faces of a held-out person."""
    opt = yaml.safe_load(path.read_text())
    if plan.cuda:
        return opt
    train, val = opt["datasets"]["train"], opt["datasets"]["val"]
    train.update(dataroots=["tests/data/celebref"], num_refs=1, num_worker_per_gpu=0, batch_size_per_gpu=1)
    train.update(dataset_enlarge_ratio=1, pin_memory=False)
    val.update(dataroot_gt="tests/data/heldout", include_identities=[HELDOUT[0]], num_refs=1)
    opt.update(name=DRY_NAME, num_gpu=0)
    opt["train"]["total_iter"] = 2
    opt["val"]["val_freq"] = 10  # BasicSR validates once more at the end: that one is enough here
    opt["logger"].update(print_freq=1, save_checkpoint_freq=2)
    return opt


@dataclasses.dataclass
class Training:
    """A training started detached: its process group (the leader's pid) and its console log."""

    name: str
    pid: int
    log: Path
    launcher: str
    process: subprocess.Popen | None = None  # in the call that started it

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def save(self) -> None:
        record = {"name": self.name, "pid": self.pid, "log": str(self.log), "launcher": self.launcher}
        (STATE / f"{self.name}.json").write_text(json.dumps(record))

    @classmethod
    def load(cls, name: str) -> Training:
        record = json.loads((STATE / f"{name}.json").read_text())
        return cls(record["name"], record["pid"], Path(record["log"]), record["launcher"])


def launch(opt_file: Path, name: str, dist: bool) -> Training:
    """basicsr_arch/train.py in a new process session, so that it outlives the call, resuming a run of the
    same name. ``dist``: through torchrun, one process, ``--launcher pytorch`` (NCCL on CUDA)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cmd = [*(torchrun if dist else [sys.executable]), "basicsr_arch/train.py", "-opt", str(opt_file), "--auto_resume"]
    cmd += ["--launcher", "pytorch"] if dist else []
    log = STATE / f"{name}.log"
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        env = {**os.environ, "NCCL_DEBUG": "VERSION", "PYTHONUNBUFFERED": "1"}
        streams = {"stdout": out, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **streams)
    run = Training(name, process.pid, log, "torchrun, 1 process, --launcher pytorch" if dist else "plain", process)
    run.save()
    return run


def progress(log: Path) -> dict:
    """What BasicSR's console log says: the last iteration, seconds per iteration, validations, NCCL."""
    text = log.read_text(errors="replace") if log.exists() else ""
    times = [float(t) for t in re.findall(r"time \(data\): ([\d.]+)", text)]
    validations = re.findall(r"Validation \S+ @ (\d+): (.*)", text)
    nccl = re.search(r"NCCL version \S+", text)
    return {
        "iteration": max(map(int, re.findall(r"iter:\s*(\d+),", text)), default=0),
        "validations": [(int(at), dict(kv.rsplit(" ", 1) for kv in got.split(", "))) for at, got in validations],
        "s/iteration": statistics.median(times[1:]) if len(times) > 1 else None,
        "nccl": nccl.group(0) if nccl else None,
        "text": text,
    }


def stage_training(ctx: Context, deadline: float) -> None:
    """Start the training detached (through torchrun; plainly if that stops before its first step),
    follow it to the end of the budget, then copy its newest checkpoint out; it trains on after."""
    plan, results = ctx.plan, ctx.results
    if (basicsr := ensure_basicsr(results)).startswith("missing"):
        results.skip("training", f"BasicSR {basicsr}")
        return
    opt = training_options(plan, ctx.train_opt)
    sets = opt["datasets"]
    roots = [r if isinstance(r, str) else r["path"] for r in sets["train"]["dataroots"]] + [sets["val"]["dataroot_gt"]]
    if missing := [r for r in roots if not (ROOT / r).is_dir()]:
        how = "`python benchmarks/gpu_check.py gpu_pack/faces --pack` where ../shared/faces is, and carry gpu_pack"
        results.skip("training", f"no faces at {', '.join(missing)}: make them with {how}")
        return
    name = opt["name"]
    STATE.mkdir(parents=True, exist_ok=True)
    if not plan.cuda:  # the rehearsal starts afresh; on the GPU a run of the same name is resumed
        for folder in (ROOT / "experiments" / name, ROOT / "tb_logger" / name):
            shutil.rmtree(folder, ignore_errors=True)
        (STATE / f"{name}.log").unlink(missing_ok=True)
    opt_file = STATE / f"{name}.yml"
    opt_file.write_text(yaml.safe_dump(opt, sort_keys=False))
    if plan.cuda:
        torch.cuda.empty_cache()
    run = launch(opt_file, name, dist=True)
    results.log(f"training: started ({run.launcher}), process group {run.pid}, log {run.log.relative_to(ROOT)}")
    while run.alive() and progress(run.log)["iteration"] == 0 and time.monotonic() < deadline:
        time.sleep(2)
    if not run.alive() and progress(run.log)["iteration"] == 0:
        results.log(f"training: torchrun stopped before its first step:\n{progress(run.log)['text'][-3000:]}")
        run = launch(opt_file, name, dist=False)
    follow(run, results, deadline)
    fetch(run, results, opt)
    if run.process.poll():
        raise RuntimeError(f"the training ended with exit status {run.process.poll()}: see train_log.txt")


def follow(run: Training, results: Results, until: float) -> None:
    """Wait for the training to end or for ``until``, logging its iteration every half minute."""
    logged = 0.0
    while run.alive() and time.monotonic() < until:
        if time.monotonic() - logged > 30:
            results.log(f"training: iteration {progress(run.log)['iteration']}")
            logged = time.monotonic()
        time.sleep(min(2.0, max(0.0, until - time.monotonic())))


def fetch(run: Training, results: Results, opt: dict | None = None) -> None:
    """The training's table, its console log and its newest checkpoint (EMA weights as fp16 safetensors,
    in parts of 15 MiB when larger: a call brings back files of at most 16 MiB)."""
    seen = progress(run.log)
    rows = {
        "run": run.name,
        "launcher": run.launcher,
        "still training": run.alive(),
        "exit status": None if run.process is None else run.process.poll(),
        "process group": seen["nccl"] or "no NCCL line in the log (gloo on the CPU)",
        "autocast": (opt or {}).get("train", {}).get("autocast", "as the option file says"),
        "iterations": seen["iteration"],
        "s/iteration (median)": seen["s/iteration"],
    }
    for at, metrics in seen["validations"]:
        rows[f"validation @ {at}"] = ", ".join(f"{k} {v}" for k, v in metrics.items() if k.startswith("psnr"))
        gain = float(metrics.get("psnr_generic", "nan")) - float(metrics.get("psnr_input", "nan"))
        rows[f"generic over the input @ {at}, dB (the bar: +1)"] = gain
    models = sorted((ROOT / "experiments" / run.name / "models").glob("net_g_*.pth"), key=lambda p: p.stat().st_mtime)
    if models:
        target = results.folder / f"{run.name}_{models[-1].stem}_ema_fp16.safetensors"
        convert(models[-1], target, half=True)
        rows["checkpoint"] = f"{models[-1].name} -> " + ", ".join(p.name for p in split(target))
    else:
        rows["checkpoint"] = "none saved yet"
    for item, value in rows.items():
        results.add("training", item, value)
    (results.folder / "train_log.txt").write_text(seen["text"][-(2 << 20) :])


def split(path: Path) -> list[Path]:
    """``path``, or its parts of MAX_FILE bytes (``cat NAME.part* > NAME`` joins them)."""
    if path.stat().st_size <= MAX_FILE:
        return [path]
    data, parts = path.read_bytes(), []
    for start in range(0, len(data), MAX_FILE):
        parts.append(path.with_name(f"{path.name}.part{start // MAX_FILE}"))
        parts[-1].write_bytes(data[start : start + MAX_FILE])
    path.unlink()
    return parts


def stop_training(out: Path, name: str, wait: float) -> int:
    """``--stop``: let the training run ``wait`` seconds more, end its process group, fetch it."""
    results = Results(out)
    try:
        run = Training.load(name)
    except OSError:
        results.log(f"gpu_check: no training was started here ({STATE / name}.json is missing)")
        return 1
    follow(run, results, time.monotonic() + wait)
    for sig, seconds in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if not run.alive():
            break
        results.log(f"training: {sig.name} to process group {run.pid}")
        os.killpg(run.pid, sig)
        follow(run, results, time.monotonic() + seconds)
    fetch(run, results)
    print(f"\n{results.markdown()}\n{results.summary()}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- pack
def pack_faces(dest: Path, shared: Path) -> None:
    """The faces options/dmdnet_demo_gpu_check.yml trains and validates on, small enough to carry: the
    training faces as JPEG 95 at 512 px with their landmarks (dlib's, here, for the hq faces), the
    held-out people's PNGs unchanged, so that validation compares with docs/training_demo.md."""
    from dmdnet_plugin.cli import main as dmdnet

    def jpeg(src: Path, dst: Path, marks: Path | None = None) -> None:
        bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst), cv2.resize(bgr, (512, 512), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if marks is not None:  # the refs are 512 px: their landmarks hold as they are
            shutil.copyfile(marks, dst.with_name(dst.name + ".txt"))

    for person in sorted((shared / "celebref" / "refs").iterdir()):
        for src in sorted(person.glob("*.png")):
            marks = shared / "celebref" / "landmarks" / person.name / f"{src.name}.txt"
            if person.name in HELDOUT:
                (dest / "val" / person.name).mkdir(parents=True, exist_ok=True)
                for f in (src, marks):
                    shutil.copyfile(f, dest / "val" / person.name / f.name)
            else:
                jpeg(src, dest / "train" / "celebref" / person.name / f"{src.stem}.jpg", marks)
    for src in sorted((shared / "obama" / "refs").glob("*.png")):
        jpeg(src, dest / "train" / "obama" / f"{src.stem}.jpg", shared / "obama" / "landmarks" / f"{src.name}.txt")
    for src in sorted((shared / "hq").glob("*/*")):
        jpeg(src, dest / "train" / "hq" / f"{src.parent.name}_{src.stem}.jpg")
    dmdnet(["landmarks", str(dest / "train" / "hq")])  # a face it misses trains with the template boxes
    files = [f for f in dest.rglob("*") if f.suffix in (".jpg", ".png")]
    print(f"{dest}: {len(files)} faces, {sum(f.stat().st_size for f in dest.rglob('*.*')) / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------------- main
def run_check(out: Path, plan: Plan, stages: list[str], train_opt: Path) -> int:
    results = Results(out)
    end = time.monotonic() + plan.budget
    watchdog = threading.Timer(plan.budget + GRACE_S, _past_budget, (results,))
    watchdog.daemon = True
    watchdog.start()
    results.log(f"gpu_check on {plan.device}, budget {plan.budget:.0f} s, stages: {', '.join(stages)}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(plan, results, train_opt, Path(work))
        for name in stages:
            deadline = stage_deadline(plan, name, stages, end)
            start, status = time.monotonic(), "done"
            results.log(f"{name}: start ({deadline - start:.0f} s at most)")
            try:
                globals()[f"stage_{name}"](ctx, deadline)
            except OutOfTime:
                status = "cut at its deadline"
            except Exception as exc:
                status = f"failed: {type(exc).__name__}: {str(exc).strip()[:300]}"
                results.log(traceback.format_exc())
            results.add("stages", name, time.monotonic() - start, status)
            results.log(f"{name}: {status}")
    watchdog.cancel()
    print(f"\n{results.markdown()}\n{results.summary()}", flush=True)
    return 0


def stage_deadline(plan: Plan, name: str, stages: list[str], end: float) -> float:
    """The training is followed to the budget's end, less the time to copy its checkpoint out; any other
    stage gets its cap, and ends early enough for the training to start in this call."""
    if name == "training":
        return end - RESERVE_S
    keep = plan.train_share if "training" in stages else 0.0
    return min(time.monotonic() + CAPS_S[name] * plan.slack, end - keep)


def _past_budget(results: Results) -> None:
    results.log("the call ran past its budget: ending it here (the tables hold what was measured)")
    os._exit(3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder ($OUT/gpu_check on the GPU); with --pack: the faces")
    parser.add_argument("--dry-run", action="store_true", help="the tiny rehearsal, on the CPU")
    parser.add_argument("--budget", type=float, help=f"seconds for the call ({REAL.budget:g}; dry run {DRY.budget:g})")
    parser.add_argument("--stages", default=",".join(STAGES), help="some of %(default)s (run in that order)")
    parser.add_argument("--train-opt", type=Path, default=TRAIN_OPT, help="the training's option file")
    parser.add_argument("--stop", action="store_true", help="stop the training a first call started; fetch it")
    parser.add_argument("--wait", type=float, default=0.0, help="with --stop: let it train this many seconds first")
    parser.add_argument("--pack", action="store_true", help="copy the training and validation faces into OUT")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "faces", help="with --pack: from")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = DRY if args.dry_run else REAL
    plan = dataclasses.replace(plan, budget=args.budget or plan.budget)
    if args.pack:
        pack_faces(args.out, args.shared)
        return 0
    if args.stop:
        return stop_training(args.out, training_options(plan, args.train_opt)["name"], args.wait)
    if args.child:
        print(json.dumps(compile_child(args.child)))
        return 0
    if plan.cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU here; --dry-run rehearses the check on the CPU")
    asked = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in asked if s not in STAGES]:
        sys.exit(f"gpu_check: unknown stages {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return run_check(args.out, plan, [s for s in STAGES if s in asked], args.train_opt)


if __name__ == "__main__":
    sys.exit(main())
