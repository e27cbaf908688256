"""``dmdnet restore --ray``: the Ray Data operators on a real Ray started here (127.0.0.1, 2 CPUs),
through the real CLI, on real photos."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA, small_net
from photo_folders import CLI, PHOTOS, ROOT, folder, outputs, report, restore_args
from report_schema import checked

from dmdnet_plugin.cli import main
from dmdnet_plugin.face_helper import FaceHelper
from dmdnet_plugin.faces import DlibBackend
from dmdnet_plugin.io import Picture, read_image
from dmdnet_plugin.journal import journal_path
from dmdnet_plugin.pipeline import Mode, Restorer

pytest.importorskip("ray.data")  # the [ray] extra; `make test` installs it
pyarrow_fs = pytest.importorskip("pyarrow.fs")
# needs pyarrow and Ray Data, from the [ray] extra
from dmdnet_plugin.cluster import (  # noqa: E402
    Storage,
    columns_detection,
    columns_results,
    detection_columns,
    result_columns,
)

RESTORE_ACTOR = "ray::MapWorker(MapBatches(_Restore))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A Ray head with 2 CPUs on this machine, as `ray start` makes one; stopped after the module.

    Ray 2.60 with ``RAY_AUTH_MODE=token`` wants a token from the head and from every client, and
    looks in ``$RAY_AUTH_TOKEN`` before ``$RAY_AUTH_TOKEN_PATH`` and ``~/.ray/auth_token``: one made
    here, in this process's environment (which the head and the CLI runs inherit), so that a fresh
    machine needs none, a token file elsewhere changes nothing, and ``~/.ray`` is never written.
    The head's workers run torch on one thread (``OMP_NUM_THREADS=1``, Ray's own default for a
    one-CPU actor), whatever this machine's environment says: a face's fp32 pixels depend on the
    thread count (docs/scale.md)."""
    port, log = _free_port(), tmp_path_factory.mktemp("ray") / "head.log"
    # its own session folder (a short path: Ray's sockets live there), so that the cluster file of
    # /tmp/ray does not keep pointing at this head once it is gone
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        head = subprocess.Popen(
            [Path(sys.executable).with_name("ray"), "start", "--head", "--block", "--port", str(port)]
            + ["--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"]
            + ["--object-store-memory", str(500 * 2**20), "--disable-usage-stats", "--temp-dir", temp],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its process group: the head and everything it started
        )
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
        os.killpg(head.pid, signal.SIGKILL)  # its workers end with their raylet
        head.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _ray_command(inputs: str, out: Path, rep: Path, weights: Path, address: str) -> list[str]:
    return [*CLI, *restore_args(inputs, out, rep, weights, "--precision", "fp32", "--ray", "--ray-address", address)]


def _journaled(out: Path) -> list[dict]:
    """The report entries of the journal of the runs into ``out`` (its first line names the run)."""
    lines = [json.loads(line) for line in journal_path(out).read_text().splitlines()]
    return [line["entry"] for line in lines if "entry" in line]


def _processes(title: str) -> dict[int, str]:
    """The processes whose title starts with ``title`` (Ray names its workers by what they run)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            name = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and name.startswith(title):
            found[int(entry.name)] = name
    return found


def test_ray_gives_the_cli_pixels_and_report(small_weights, tmp_path, ray_address):
    """The same folder through `dmdnet restore` and through `--ray` (inputs and output as file://
    URIs, opened with pyarrow), both in fp32 on one torch thread, as the model actor runs: the same
    bytes in every output, the same report. Two windows, the second a short one: the model stage's
    batches must be the photo stream's windows: a face's pixels can depend on its batch, and the model
    actor says so when a batch is not a whole window."""
    inputs = folder(tmp_path, copies=2)  # 11 files: windows of 8 and 3
    plain = subprocess.run(
        [
            *CLI,
            *restore_args(inputs, tmp_path / "plain", tmp_path / "plain.json", small_weights, "--precision", "fp32"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    run = subprocess.run(
        _ray_command(f"file://{inputs}", tmp_path / "ray", tmp_path / "ray.json", small_weights, ray_address),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 1 and run.returncode == 1, run.stderr[-3000:]  # the broken file; the rest went on
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "plain")
    assert report(tmp_path / "ray.json") == report(tmp_path / "plain.json")
    assert checked(tmp_path / "ray.json")["engine"] == "ray" and checked(tmp_path / "plain.json")["engine"] == "stream"
    entries = report(tmp_path / "ray.json")
    assert [e["status"] for e in entries].count("ok") == 2 * len(PHOTOS) and "broken.png" in entries[-1]["error"]
    assert f"error: {inputs / 'broken.png'}: " in run.stderr
    assert "Ray Data gave the model" not in run.stderr  # every batch of the model stage was a whole window


def test_a_photos_faces_cross_stages_as_arrow_columns_unchanged(tmp_path):
    """What the detect and restore stages hand on, through Ray Data's own conversion to an Arrow block
    and back to numpy (no Python objects in it): the same faces, values and dtypes, the same
    identities and matching decisions (only-matched mode: one face restored with person 00005's
    identity, one left as it was), for a photo with faces and one without."""
    from ray.data.block import BlockAccessor

    left = cv2.imread(str(DATA / "celebref" / "00005" / "3.jpg"))
    right = cv2.imread(str(DATA / "lq" / "00022_14.jpg"))
    photo = Picture(cv2.cvtColor(np.hstack([left, right]), cv2.COLOR_BGR2RGB))
    blank = Picture(np.full((64, 80, 3), 128, np.uint8))
    restorer = Restorer(small_net(), FaceHelper(DlibBackend("hog")))
    identity, _ = restorer.build_identity([DATA / "celebref" / "00005" / f"{i}.jpg" for i in (0, 1, 2)], name="p5")
    detections = restorer.helper.find([photo, blank], embed=True)
    results = restorer.restore_faces(detections, Mode.ONLY_MATCHED, [identity])
    rows = [{**detection_columns(d), **result_columns(r, [identity])} for d, r in zip(detections, results)]
    block = BlockAccessor.batch_to_block({name: [row[name] for row in rows] for name in rows[0]})
    assert not [f for f in block.schema if "object" in str(f.type).lower()]  # Arrow types, no pickles
    batch = BlockAccessor.for_block(block).to_batch_format("numpy")
    back = [dict(zip(batch, values)) for values in zip(*batch.values())]

    assert [len(r) for r in results] == [2, 0] and [len(columns_detection(b).faces) for b in back] == [2, 0]
    for detection, result, row in zip(detections, results, back):
        again = columns_detection(row)
        assert again.skipped == detection.skipped
        for face, same in zip(detection.faces, again.faces):
            for a, b in [
                (face.crop, same.crop),
                (face.matrix, same.matrix),
                (face.boxes, same.boxes),
                (face.box, same.box),
                (face.face.landmarks, same.face.landmarks),
                (face.face.embedding, same.face.embedding),
            ]:
                assert a.dtype == b.dtype and np.array_equal(a, b)
            assert (same.face.score, same.boxes_from) == (face.face.score, face.boxes_from)
        faces = columns_results(row, again, [identity])
        assert [f.record() for f in faces] == [f.record() for f in result]
        assert [f.identity for f in faces] == [f.identity for f in result]
        for face, same in zip(result, faces):
            assert (same.restored is None) == (face.restored is None)
            assert face.restored is None or np.array_equal(face.restored, same.restored)
    faces = columns_results(back[0], columns_detection(back[0]), [identity])
    matched, left_as_is = sorted(faces, key=lambda f: f.face.box[0])
    assert matched.identity is identity and matched.match.identity is identity and matched.restored is not None
    assert left_as_is.restored is None and left_as_is.left_as_is.startswith("no identity matched")


def test_killing_the_model_worker_mid_run_still_writes_every_output_once(
    small_weights, tmp_path, ray_address, monkeypatch
):
    """SIGKILL to the actor that holds the model while it restores a window: Ray starts another, the
    window is restored again, every output is written once, and the run ends as an uninterrupted one."""
    inputs = folder(tmp_path, copies=4)  # 21 files: windows of 8, 8 and 5
    out, rep = tmp_path / "out", tmp_path / "report.json"
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    run = subprocess.Popen(
        _ray_command(str(inputs), out, rep, small_weights, ray_address), cwd=ROOT, stderr=subprocess.PIPE
    )
    deadline, killed = time.monotonic() + 300, None
    while killed is None:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        busy = [pid for pid, title in _processes(RESTORE_ACTOR).items() if title.endswith(".submit")]
        written = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())  # not a .part
        if busy and written:  # restoring a window, and one output is whole
            killed = busy[0]
            before = {p.name: p.stat().st_ino for p in out.iterdir() if not p.name.startswith(".")}
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 1, stderr.decode()[-3000:]  # the broken file
    journal = [entry["input"] for entry in _journaled(out)]
    assert killed not in _processes(RESTORE_ACTOR)
    total = len(PHOTOS) * 4 + 1
    assert 0 < len(before) < total - 1, sorted(before)
    assert sorted(journal) == sorted(str(p) for p in inputs.iterdir())  # each input finished once
    assert [n for n, ino in before.items() if (out / n).stat().st_ino != ino] == []  # not written again
    entries = checked(rep)["files"]
    assert [e["status"] for e in entries].count("ok") == total - 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.iterdir() if p.name != "broken.png")
    for name in out.iterdir():
        assert read_image(name).size == read_image(inputs / name.name).size


def test_an_interrupted_ray_run_restores_only_what_is_missing(small_weights, tmp_path, ray_address, monkeypatch):
    """The driver killed after its first window, the same command again: the inputs the journal holds
    are kept as they are, the rest restored; the report covers all."""
    inputs = folder(tmp_path, copies=4)
    out, rep = tmp_path / "out", tmp_path / "report.json"
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    cmd = _ray_command(str(inputs), out, rep, small_weights, ray_address)
    first = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (journal_path(out).is_file() and len(_journaled(out)) >= 8):
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = {Path(entry["output"]).name for entry in _journaled(out)[:8] if entry["output"]}
    kept = {name: (out / name).stat().st_mtime_ns for name in done}
    total = len(PHOTOS) * 4 + 1

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"of {total} inputs already restored by an earlier run" in second.stderr
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())
    entries = checked(rep)["files"]
    assert [e["input"] for e in entries] == [str(p) for p in sorted(inputs.iterdir())]
    assert [e["status"] for e in entries].count("ok") == total - 1
    assert not [p for p in out.iterdir() if ".part" in p.name]


def test_an_address_where_no_cluster_listens_is_one_line(small_weights, tmp_path, capsys):
    args = ["restore", str(ROOT / "examples" / "photos"), "-o", str(tmp_path / "o"), "--ray", "--ray-address"]
    assert main([*args, f"127.0.0.1:{_free_port()}", "--weights", str(small_weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot reach the Ray cluster at 127.0.0.1:") and "refused" in err


def test_storage_on_a_filesystem_other_than_local_files(tmp_path):
    """The code paths of s3:// and gs:// (listing, reading, writing through pyarrow), on a pyarrow
    filesystem that is not the local one: a subtree of this machine's files."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.JPG", "notes.txt"):
        (tmp_path / "in" / name).write_bytes((PHOTOS[1]).read_bytes())
    fs = pyarrow_fs.SubTreeFileSystem(str(tmp_path), pyarrow_fs.LocalFileSystem())
    store = Storage(fs, "in", "sub")
    found = store.found(["sub://in"], "sub://out")
    assert [(f.src, str(f.relative)) for f in found] == [
        ("sub://in/a.jpg", "a.jpg"),
        ("sub://in/sub/b.JPG", "sub/b.JPG"),
    ]
    assert store.path("sub://in/a.jpg") == "in/a.jpg" and Storage(fs, "out", "sub").join(Path("sub/b.JPG")) == (
        "sub://out/sub/b.JPG"
    )
    assert store.read("in/sub/b.JPG") == PHOTOS[1].read_bytes()
    assert store.stamp("sub://out/x.png") is None
    picture = read_image(PHOTOS[1])
    store.save(Path("out/x.png"), picture.pixels, None)
    assert store.stamp("sub://out/x.png").size == (tmp_path / "out" / "x.png").stat().st_size
    assert np.array_equal(read_image(tmp_path / "out" / "x.png").pixels, picture.pixels)
    with pytest.raises(Exception, match="in/missing.jpg"):
        store.read("in/missing.jpg")
