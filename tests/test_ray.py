"""``dmdnet restore --ray``: the Ray Data operators on a real Ray started here (127.0.0.1, 2 CPUs),
through the real CLI, on real photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from photo_folders import CLI, PHOTOS, ROOT, folder, outputs, report, restore_args

from dmdnet_plugin.cli import main
from dmdnet_plugin.io import read_image
from dmdnet_plugin.stream import journal_path

pytest.importorskip("ray.data")  # the [ray] extra; `make test` installs it
pyarrow_fs = pytest.importorskip("pyarrow.fs")
from dmdnet_plugin.cluster import Storage  # noqa: E402  (needs pyarrow, from the [ray] extra)

RESTORE_ACTOR = "ray::MapWorker(MapBatches(_Restore))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A Ray head with 2 CPUs on this machine, as `ray start` makes one; stopped after the module."""
    port, log = _free_port(), tmp_path_factory.mktemp("ray") / "head.log"
    # its own session folder (a short path: Ray's sockets live there), so that the cluster file of
    # /tmp/ray does not keep pointing at this head once it is gone
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_AUTH_MODE"] = "token"  # Ray 2.60 clusters want their token from clients
    head = subprocess.Popen(
        [Path(sys.executable).with_name("ray"), "start", "--head", "--block", "--port", str(port)]
        + ["--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--include-dashboard", "false"]
        + ["--object-store-memory", str(500 * 2**20), "--disable-usage-stats", "--temp-dir", temp],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its process group: the head and everything it started
    )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGKILL)  # its workers end with their raylet
    head.wait()
    os.environ.pop("RAY_AUTH_MODE")
    shutil.rmtree(temp, ignore_errors=True)


def _command(inputs: str, out: Path, rep: Path, weights: Path, *extra: str) -> list[str]:
    return [*CLI, *restore_args(inputs, out, rep, weights, "--precision", "fp32", *extra)]


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
    URIs, opened with pyarrow): the same bytes in every output, the same report."""
    inputs = folder(tmp_path)
    fp32 = ("--precision", "fp32")
    plain = main(restore_args(inputs, tmp_path / "plain", tmp_path / "plain.json", small_weights, *fp32))
    run = subprocess.run(
        _command(f"file://{inputs}", tmp_path / "ray", tmp_path / "ray.json", small_weights, "--ray", ray_address),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain == 1 and run.returncode == 1, run.stderr[-3000:]  # the broken file; the rest went on
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "plain")
    assert report(tmp_path / "ray.json") == report(tmp_path / "plain.json")
    entries = report(tmp_path / "ray.json")
    assert [e["status"] for e in entries].count("ok") == len(PHOTOS) and "broken.png" in entries[-1]["error"]
    assert f"error: {inputs / 'broken.png'}: " in run.stderr


def test_killing_the_model_worker_mid_run_still_writes_every_output_once(
    small_weights, tmp_path, ray_address, monkeypatch
):
    """SIGKILL to the actor that holds the model while it restores a window: Ray starts another, the
    window is restored again, every output is written once, and the run ends as an uninterrupted one."""
    inputs = folder(tmp_path, copies=4)  # 21 files: three windows of 8
    out, rep = tmp_path / "out", tmp_path / "report.json"
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    run = subprocess.Popen(
        _command(str(inputs), out, rep, small_weights, "--ray", ray_address), cwd=ROOT, stderr=subprocess.PIPE
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
    journal = [json.loads(line)["entry"]["input"] for line in journal_path(out).read_text().splitlines()]
    assert killed not in _processes(RESTORE_ACTOR)
    total = len(PHOTOS) * 4 + 1
    assert 0 < len(before) < total - 1
    assert sorted(journal) == sorted(str(p) for p in inputs.iterdir())  # each input finished once
    assert all((out / name).stat().st_ino == ino for name, ino in before.items())  # not written again
    entries = report(rep)
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
    cmd = _command(str(inputs), out, rep, small_weights, "--ray", ray_address)
    first = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    journal, deadline = journal_path(out), time.monotonic() + 300
    while not (journal.is_file() and len(journal.read_text().splitlines()) >= 8):
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    done = {Path(json.loads(line)["entry"]["output"]).name for line in journal.read_text().splitlines()[:8]}
    kept = {name: (out / name).stat().st_mtime_ns for name in done}
    total = len(PHOTOS) * 4 + 1

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"of {total} inputs already restored by an earlier run" in second.stderr
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())
    entries = report(rep)
    assert [e["input"] for e in entries] == [str(p) for p in sorted(inputs.iterdir())]
    assert [e["status"] for e in entries].count("ok") == total - 1
    assert not [p for p in out.iterdir() if ".part" in p.name]


def test_an_address_where_no_cluster_listens_is_one_line(small_weights, tmp_path, capsys):
    args = ["restore", str(ROOT / "examples" / "photos"), "-o", str(tmp_path / "o"), "--ray"]
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
    assert store.images(["sub://in"]) == ["in/a.jpg", "in/sub/b.JPG"] and store.name("in/a.jpg") == "sub://in/a.jpg"
    picture = store.load(Path("in/sub/b.JPG"))
    assert np.array_equal(picture.pixels, read_image(PHOTOS[1]).pixels)
    assert not store.exists("sub://out/x.png")
    store.save(Path("out/x.png"), picture.pixels, None)
    assert store.exists("sub://out/x.png") and store.exists("out/x.png")
    assert np.array_equal(read_image(tmp_path / "out" / "x.png").pixels, picture.pixels)
    with pytest.raises(Exception, match="in/missing.jpg"):
        store.load(Path("in/missing.jpg"))
