"""benchmarks/gpu_check.py: its CPU rehearsal (--dry-run) writes every table and log a lent GPU would,
--stop fetches the training it started, a stage past its deadline leaves what it measured, and the
real check refuses to start without CUDA."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("basicsr")  # the rehearsal trains a few steps with BasicSR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from conftest import small_net  # noqa: E402
from parity_inputs import load_parity_inputs  # noqa: E402

from dmdnet_plugin import load_model  # noqa: E402


def run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def remove_rehearsal_training() -> None:
    for folder in (ROOT / "experiments" / gpu_check.DRY_NAME, ROOT / "tb_logger" / gpu_check.DRY_NAME):
        shutil.rmtree(folder, ignore_errors=True)
    for suffix in (".json", ".log", ".yml"):
        (gpu_check.STATE / f"{gpu_check.DRY_NAME}{suffix}").unlink(missing_ok=True)
    if gpu_check.STATE.is_dir() and not any(gpu_check.STATE.iterdir()):
        gpu_check.STATE.rmdir()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_out") / "gpu_check"
    proc = run(str(out), "--dry-run")
    yield proc, out
    remove_rehearsal_training()


def rows(out: Path) -> dict[str, list[dict]]:
    return json.loads((out / "results.json").read_text())


def test_the_rehearsal_writes_every_table_and_log(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = rows(out)
    stages = [(r["stage"], r["status"]) for r in tables["stages"]]
    assert stages == [(name, "done") for name in gpu_check.STAGES]
    # what a lent GPU brings back: at most 8 files of at most 16 MiB, in the one folder
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() and (out / f).stat().st_size < 16 << 20 for f in files)
    assert {"tables.md", "results.json", "log.txt", "train_log.txt"} <= set(files)
    markdown = (out / "tables.md").read_text()
    assert all(f"## {name}\n" in markdown for name in tables)
    assert markdown.strip() in proc.stdout  # the call's output ends with the tables and a summary

    checks = [(r["model"], r["check"], r["precision"]) for r in tables["correctness"]]
    vs_fp32 = [("seeded, ngf 16", f"{path} vs fp32", "bf16") for path in ("generic", "identity")]
    assert checks == vs_fp32 + [("seeded, ngf 16", "batch vs one by one", p) for p in ("fp32", "bf16")]
    assert all(r["ok"] and r["mean abs"] <= r["max abs"] for r in tables["correctness"])
    assert [r["ok"] for r in tables["pipeline"]] == [True, True]
    assert all(r["faces restored"] == r["pictures"] == 2 for r in tables["pipeline"])

    (generic, identity) = tables["flops"]
    assert 20 < generic["GFLOP/face"] < 30 and identity["GFLOP/face"] > generic["GFLOP/face"]  # ngf 16: 378 / 16
    speed = {(r["batch"], r["precision"], r["path"]): r for r in tables["speed"]}
    paths = (("fp32", "authors-style"), ("fp32", "restore"), ("bf16", "restore"))
    assert set(speed) == {(batch, precision, path) for batch in (1, 2) for precision, path in paths}
    for r in speed.values():
        assert r["faces/s"] > 0 and r["peak MiB"] > 0
        assert math.isclose(r["TFLOP/s"], r["faces/s"] * generic["GFLOP/face"] / 1e3)
    assert [r["variant"] for r in tables["variants"]] == [
        "restore (channels_last input)",
        "restore from host tensors",
        "NCHW input",
    ]
    assert all(r["within tolerance"] for r in tables["variants"])
    assert [(r["photos"], r["faces"]) for r in tables["photos"]] == [(2, 2), (2, 2)]

    skipped = [(r["stage"], r["reason"]) for r in tables["skipped"]]
    assert [stage for stage, _ in skipped] == ["correctness", "correctness", "variants"]
    assert all("CUDA" in reason for _, reason in skipped[1:3])
    # the exported file in onnxruntime's CPU provider, against torch's fp32 on the same real faces
    (onnx_row,) = tables["onnx"]
    assert onnx_row["provider"] == "CPUExecutionProvider" and onnx_row["faces"] == 2 and onnx_row["ok"]
    assert 0 < onnx_row["max abs vs torch fp32"] <= 1e-3 and onnx_row["faces/s"] > 0
    log = (out / "log.txt").read_text()
    assert all(f"{stage}: skipped: {reason}" in log for stage, reason in skipped)


def test_the_rehearsal_trains_through_torchrun_and_copies_the_checkpoint(dry_run):
    _, out = dry_run
    training = {r["item"]: r["value"] for r in rows(out)["training"]}
    assert training["launcher"] == "torchrun, 1 process, --launcher pytorch"
    assert training["iterations"] == 2 and training["autocast"] == "bf16" and training["still training"] is False
    assert training["exit status"] == 0
    validation = next(v for k, v in training.items() if k.startswith("validation @"))
    assert "psnr_generic" in validation and "psnr_input" in validation
    assert "iter:       2," in (out / "train_log.txt").read_text()
    (checkpoint,) = out.glob("*.safetensors")
    assert training["checkpoint"].endswith(checkpoint.name)
    model = load_model(checkpoint, device="cpu")
    assert model.net.config == {"ngf": 16, "banks_num": 16}  # the bundled demo's size, trained on
    inputs = load_parity_inputs()
    assert torch.isfinite(model.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])).all()


def test_stop_fetches_the_training_a_first_call_started(dry_run, tmp_path):
    proc = run(str(tmp_path / "stop"), "--stop", "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    training = {r["item"]: r["value"] for r in rows(tmp_path / "stop")["training"]}
    assert training["iterations"] == 2 and training["still training"] is False
    assert len(list((tmp_path / "stop").glob("*.safetensors"))) == 1
    assert (tmp_path / "stop" / "train_log.txt").stat().st_size > 0


def test_stop_without_a_training_says_so(tmp_path):
    opt = tmp_path / "never_started.yml"
    opt.write_text("name: never_started\n")
    proc = run(str(tmp_path / "stop"), "--stop", "--train-opt", str(opt), timeout=300)
    assert proc.returncode == 1 and "no training was started here" in proc.stdout


def test_a_stage_past_its_deadline_leaves_its_rows_and_the_next_stage_runs(tmp_path, monkeypatch):
    """speed counts the FLOPs, then finds its deadline gone: its flops rows stay, its status says so, and
    the next stage still runs. A budget of 0 s puts the deadline before the first timed row on any machine
    (a 1 s budget let a fast CPU time one). The watchdog is pushed out of the way: it would end this process."""
    monkeypatch.setattr(gpu_check, "GRACE_S", 3600.0)
    plan = gpu_check.dataclasses.replace(gpu_check.DRY, budget=0.0, train_share=0.0)
    assert gpu_check.run_check(tmp_path, plan, ["speed", "environment"], gpu_check.TRAIN_OPT) == 0
    tables = rows(tmp_path)
    assert [(r["stage"], r["status"]) for r in tables["stages"]] == [
        ("speed", "cut at its deadline"),
        ("environment", "done"),
    ]
    assert len(tables["flops"]) == 2 and "speed" not in tables


def test_the_watchdog_ends_a_stage_that_hangs_and_the_rows_stay(tmp_path):
    """A stage that never looks at its deadline (here one that sleeps) is ended by the watchdog."""
    hang = (
        "import sys, time; sys.path.insert(0, 'benchmarks'); import gpu_check as g; "
        "g.GRACE_S = 1.0; g.stage_onnx = lambda ctx, deadline: time.sleep(120); "
        f"g.run_check(g.Path({str(tmp_path)!r}), g.dataclasses.replace(g.DRY, budget=15.0), "
        "['environment', 'onnx'], g.TRAIN_OPT)"
    )
    proc = subprocess.run([sys.executable, "-c", hang], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert "ran past its budget" in (tmp_path / "log.txt").read_text()
    assert [(r["stage"], r["status"]) for r in rows(tmp_path)["stages"]] == [("environment", "done")]


def test_an_overflow_the_final_tanh_hides_is_found_in_its_module():
    net = small_net()
    inputs = load_parity_inputs()

    def restore() -> torch.Tensor:
        return net.restore(inputs["lq"][:1], inputs["lq_boxes"][:1])

    assert gpu_check.nonfinite_modules(net, restore) == []
    with torch.no_grad():
        net.up4[4].bias.fill_(float("inf"))  # the last convolution, before the tanh
    assert torch.isfinite(restore()).all()
    assert gpu_check.nonfinite_modules(net, restore) == ["up4.4"]


def test_the_compiled_variant_folds_the_spectral_norms_into_one_graph():
    """torch.compile breaks its graph at each SNConv2d (its fold cache); the folded copy gives the
    same output as one graph."""
    net = small_net()
    inputs = load_parity_inputs()
    x = inputs["lq"][:1].contiguous(memory_format=torch.channels_last)
    boxes = inputs["lq_boxes"][:1]
    plain = gpu_check.folded_copy(net)
    assert not any(isinstance(m, gpu_check.SNConv2d) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(x, boxes).generic, net(x, boxes).generic)
        assert torch._dynamo.explain(plain)(x, boxes).graph_break_count == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_real_check_refuses_to_start_without_cuda(tmp_path):
    proc = run(str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    line = "gpu_check: torch sees no CUDA GPU here; --dry-run rehearses the check on the CPU"
    assert proc.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "out").exists()
