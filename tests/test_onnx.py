"""`dmdnet export-onnx` (docs/onnx.md): the file restores the real parity faces as `restore` does, in
onnxruntime on CPU. One export of the official-size model (the enhancer-slot file: template boxes, one
input); identity folding and the boxes input on the small configuration, in one export."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import small_net
from parity_inputs import load_parity_inputs

from dmdnet_plugin.align import TEMPLATE_BOXES
from dmdnet_plugin.cli import main
from dmdnet_plugin.weights import save_checkpoint

ort = pytest.importorskip("onnxruntime", reason='pip install "dmdnet-plugin[onnx]"')
onnx = pytest.importorskip("onnx", reason='pip install "dmdnet-plugin[onnx]"')
pytest.importorskip("onnxscript", reason='pip install "dmdnet-plugin[onnx]"')

TOLERANCE = 1e-3  # largest difference from torch's fp32 output, on [-1, 1]


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def signature(values) -> list[tuple]:
    return [(v.name, v.shape, v.type) for v in values]


def test_official_size_enhancer_file_restores_as_torch_does(official_net, tmp_path, capsys):
    weights = save_checkpoint(official_net, tmp_path / "official.safetensors")
    out = tmp_path / "dmdnet.onnx"
    assert main(["export-onnx", str(out), "--weights", str(weights)]) == 0
    assert f"wrote {out} (generic, template boxes," in capsys.readouterr().err
    model = session(out)
    face = ["N", 3, 512, 512]
    assert signature(model.get_inputs()) == [("input", face, "tensor(float)")]  # what enhancer slots feed
    assert signature(model.get_outputs()) == [("output", face, "tensor(float)")]
    meta = model.get_modelmeta().custom_metadata_map
    assert meta["dmdnet.output"] == "generic" and meta["dmdnet.model_fingerprint"] == official_net.fingerprint()
    graph = onnx.load(out)
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", 17)]  # DirectML's newest
    ops = {node.op_type for node in graph.graph.node}
    assert "Conv" in ops and not ops & {"ScatterElements", "Gather", "Shape"}  # the template's indexing folded

    lq = load_parity_inputs()["lq"]
    expected = official_net.restore(lq, np.broadcast_to(TEMPLATE_BOXES, (2, 4, 4)).copy()).numpy()
    got = model.run(None, {"input": lq.numpy()})[0]
    assert np.abs(got - expected).max() <= TOLERANCE
    one = model.run(None, {"input": lq[1:].numpy()})[0]  # N is dynamic
    assert one.shape == (1, 3, 512, 512) and np.abs(one - expected[1:]).max() <= TOLERANCE


def test_identity_folded_in_with_landmark_boxes(small, small_weights, tmp_path, capsys):
    inputs = load_parity_inputs()
    identity = small.encode_identity(inputs["refs"], inputs["ref_boxes"], name="person 00005")
    ident_file = identity.save(tmp_path / "person.safetensors")
    out = tmp_path / "person.onnx"
    args = ["export-onnx", str(out), "--weights", str(small_weights), "--identity", str(ident_file), "--boxes-input"]
    assert main(args) == 0
    assert "(identity person 00005, boxes input," in capsys.readouterr().err
    model = session(out)
    assert signature(model.get_inputs())[1] == ("boxes", ["N", 4, 4], "tensor(int64)")
    meta = model.get_modelmeta().custom_metadata_map
    assert meta["dmdnet.identity_name"] == "person 00005" and meta["dmdnet.identity_sha256"] == identity.digest()

    lq, boxes = inputs["lq"], inputs["lq_boxes"]
    assert not torch.equal(boxes[0], boxes[1])  # each face its own boxes
    expected = small.restore(lq, boxes, identity).numpy()
    generic = small.restore(lq, boxes).numpy()
    assert np.abs(expected - generic).max() > 20 * TOLERANCE  # the person's atoms change the face
    got = model.run(None, {"input": lq.numpy(), "boxes": boxes.numpy().astype(np.int64)})[0]
    assert np.abs(got - expected).max() <= TOLERANCE


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_requests_get_one_line_and_write_nothing(small_weights, tmp_path, capsys):
    inputs = load_parity_inputs()
    stranger = small_net(seed=1).encode_identity(inputs["refs"], inputs["ref_boxes"], name="stranger")
    ident_file = stranger.save(tmp_path / "stranger.safetensors")
    out = tmp_path / "out" / "stranger.onnx"
    assert main(["export-onnx", str(out), "--weights", str(small_weights), "--identity", str(ident_file)]) == 2
    assert "was built by model" in one_error_line(capsys)
    assert not out.parent.exists()

    (tmp_path / "folder.onnx").mkdir()
    assert main(["export-onnx", str(tmp_path / "folder.onnx"), "--weights", str(small_weights)]) == 2
    assert "is a folder" in one_error_line(capsys)

    (tmp_path / "file").write_text("not a folder")
    assert main(["export-onnx", str(tmp_path / "file" / "x.onnx"), "--weights", str(small_weights)]) == 2
    assert "x.onnx: cannot write it" in one_error_line(capsys)
    long = tmp_path / ("a" * 300 + ".onnx")
    assert main(["export-onnx", str(long), "--weights", str(small_weights)]) == 2
    assert one_error_line(capsys).endswith("cannot write it (File name too long)")

    before = ident_file.read_bytes()  # the identity given as OUT by a slip (no --identity): never replaced
    assert main(["export-onnx", str(ident_file), "--weights", str(small_weights)]) == 2
    assert "it must end in .onnx" in one_error_line(capsys) and ident_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.onnx", "stranger.safetensors"]


def test_a_terminated_export_leaves_nothing_behind(small_weights, tmp_path):
    """SIGTERM (``timeout``, docker stop) ends an export as Ctrl-C does: no temporary file is left."""
    out = tmp_path / "out" / "generic.onnx"
    code = "import sys\nfrom dmdnet_plugin.cli import main\nsys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "export-onnx", str(out), "--weights", str(small_weights)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.parent.is_dir() and any(out.parent.iterdir())):  # the temporary file: the export has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.endswith("error: interrupted\n"), err
    assert list(out.parent.iterdir()) == []


def test_without_the_extra_one_line_says_what_to_install(tmp_path):
    # a None entry makes `import onnxscript` fail, as it does where the extra is not installed
    code = (
        "import sys; sys.modules['onnxscript'] = None\nfrom dmdnet_plugin.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "x.onnx"
    run = subprocess.run([sys.executable, "-c", code, "export-onnx", str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert 'error: export-onnx needs the onnx extra: pip install "dmdnet-plugin[onnx]"' in run.stderr
    assert not out.exists()
