"""Files a careless or hostile user names: links, FIFOs, sockets, loops, odd names, huge bad files.

What a probe of the regular-file rule found, each on real files and the real CLI: a command that writes
one file never replaces a photo or its own input, a report is written through a link, unreadable and
odd files are one line (no traceback), a FIFO's writer is left alone, a failed photo holds no bytes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tracemalloc
from pathlib import Path

import pytest
from conftest import DATA
from photo_folders import CLI, ROOT

from dmdnet_plugin.cli import main
from dmdnet_plugin.outputs import Job
from dmdnet_plugin.stream import read_photo
from dmdnet_plugin.userfiles import checked_name
from dmdnet_plugin.weights import load_model

A = DATA / "lq" / "00005_17.jpg"
REFS = [DATA / "celebref" / "00005" / f"{i}.jpg" for i in (0, 1)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def loop(folder: Path, name: str) -> Path:
    """A link that leads to itself through another: every open of it fails with ELOOP."""
    (folder / f"{name}.other").symlink_to(folder / name)
    (folder / name).symlink_to(folder / f"{name}.other")
    return folder / name


def a_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def test_a_command_that_writes_one_file_never_replaces_a_photo_or_its_input(small, small_weights, tmp_path, capsys):
    victim = shutil.copy(A, tmp_path / "victim.jpg")
    refs = [shutil.copy(r, tmp_path / r.name) for r in REFS]
    os.mkfifo(tmp_path / "fifo.safetensors")
    base = ["--weights", str(small_weights)]
    for argv, message in (
        (["identity", "build", *map(str, refs), "-o", str(victim), *base], "it must end in .safetensors"),
        (["identity", "build", str(tmp_path), "-o", str(tmp_path / "fifo.safetensors"), *base], "not a regular file"),
        (["convert", str(small_weights), str(victim)], "it must end in .safetensors"),
        (["convert", str(small_weights), str(small_weights)], "is an input of this command"),
        (["export-onnx", str(tmp_path / "fifo.safetensors"), *base], "it must end in .onnx"),
    ):
        assert main(argv) == 2
        assert message in one_error(capsys)
    assert Path(victim).read_bytes() == A.read_bytes()
    assert [Path(r).read_bytes() for r in refs] == [r.read_bytes() for r in REFS]
    assert (tmp_path / "fifo.safetensors").is_fifo()
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "real.safetensors")
    (tmp_path / "real.safetensors").write_bytes(b"old")
    assert main(["convert", str(small_weights), str(link)]) == 0  # written through the link
    assert link.is_symlink()
    assert load_model(tmp_path / "real.safetensors", device="cpu").net.fingerprint() == small.fingerprint()


def test_the_report_is_written_through_a_link_and_a_broken_one_is_refused(small_weights, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    link = tmp_path / "report.json"
    link.symlink_to(tmp_path / "real" / "report.json")
    run = ["restore", str(A), "-o", str(tmp_path / "out"), "--weights", str(small_weights), "--precision", "fp32"]
    assert main([*run, "--report", str(link)]) == 0
    assert link.is_symlink() and b'"format": "dmdnet-report"' in (tmp_path / "real" / "report.json").read_bytes()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere" / "r.json")
    for report, message in (
        (tmp_path / "dangling.json", "a link that leads nowhere"),
        (loop(tmp_path, "loop.json"), "a link that leads nowhere"),
    ):
        assert main([*run, "--report", str(report)]) == 2
        assert message in one_error(capsys)
    assert (tmp_path / "dangling.json").is_symlink() and not (tmp_path / "nowhere").exists()


def test_odd_weights_identities_and_reports_are_one_line(small_weights, tmp_path, capsys):
    """A link loop or a socket where a checkpoint, an identity or a report should be: one line, exit 2."""
    sock = a_socket(tmp_path / "sock.safetensors")
    try:
        run = ["restore", str(A), "-o", str(tmp_path / "out"), "--precision", "fp32"]
        for extra, message in (
            (["--weights", str(loop(tmp_path, "w.safetensors"))], "cannot read it (Too many levels of symbolic"),
            (["--weights", str(tmp_path / "sock.safetensors")], "sock.safetensors: not a regular file"),
            (["--identity", str(loop(tmp_path, "i.safetensors"))], "cannot read it (Too many levels of symbolic"),
            (["--identity", str(tmp_path / "sock.safetensors")], "not a readable identity dictionary (not a regular"),
            (["--identity", "/proc/self/status"], "/proc/self/status: not a readable identity dictionary"),
        ):
            weights = [] if "--weights" in extra else ["--weights", str(small_weights)]
            assert main([*run, *weights, *extra]) == 2
            assert message in one_error(capsys)
        assert main(["identity", "show", str(tmp_path / "sock.safetensors")]) == 2
        assert "not a regular file" in one_error(capsys)
    finally:
        sock.close()


def test_names_no_output_can_keep_are_refused_before_any_work(small_weights, tmp_path, capsys):
    """The output keeps the input's name, so its format: a name without a photo or video suffix could
    only fail after its restoration (with OpenCV's own multi-line message)."""
    for name in ("noext", "photo.gif", "notes.txt"):
        shutil.copy(A, tmp_path / name)
    out = tmp_path / "out"
    argv = ["restore", *(str(tmp_path / n) for n in ("noext", "photo.gif", "notes.txt")), str(A), "-o", str(out)]
    assert main([*argv, "--weights", str(small_weights), "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 3 and all("not a photo or video name" in line and ".jpg" in line for line in lines), err
    assert sorted(p.name for p in out.iterdir()) == [A.name]


def test_crops_and_landmarks_into_a_file_are_one_line_and_a_loop_is_one_photo(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["crops", str(A), "-o", str(tmp_path / "afile")]) == 2
    assert "afile is not a folder" in one_error(capsys)
    assert main(["landmarks", str(A), "--landmarks-root", str(tmp_path / "afile")]) == 2
    assert "afile is not a folder" in one_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"
    assert main(["crops", str(loop(tmp_path, "loop.jpg")), str(A), "-o", str(tmp_path / "crops")]) == 1
    assert "loop.jpg: cannot read it (Too many levels of symbolic links)" in one_error(capsys)
    assert (tmp_path / "crops" / f"{A.stem}.png").is_file()


def test_a_fifo_is_refused_without_breaking_its_writer(small_weights, tmp_path):
    """Judged by stat before any open: opening the FIFO would have ended a writer waiting for its reader
    (SIGPIPE). The writer still waits, and its reader, once it comes, gets the photo."""
    fifo = tmp_path / "feed.jpg"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat {A} > {fifo}"])
    try:
        cmd = [*CLI, "restore", str(fifo), "-o", str(tmp_path / "out"), "--weights", str(small_weights)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 1 and f"error: {fifo}: not a regular file" in proc.stderr, proc.stderr
        assert writer.poll() is None
        assert fifo.read_bytes() == A.read_bytes()
        assert writer.wait(timeout=30) == 0
    finally:
        writer.kill()


def test_a_failed_photo_holds_no_bytes(tmp_path):
    """A failed photo's error keeps no traceback: its frames held the file's bytes, and the photos
    waiting in the stream's windows kept every bad file in memory (11 GB for five 2 GiB files)."""
    bad = []
    for i in range(4):
        with open(tmp_path / f"bad{i}.png", "wb") as f:
            f.truncate(64 << 20)  # sparse zeros: not a PNG, read whole before the decoder refuses it
        bad.append(tmp_path / f"bad{i}.png")
    tracemalloc.start()
    try:
        items = [read_photo(Job(str(p), str(tmp_path / "out" / p.name))) for p in bad]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all("not an image file" in str(item.error) for item in items)
    assert held < 16 << 20, f"{held / 2**20:.0f} MiB held by {len(items)} failed photos"


def test_a_reader_that_opens_by_name_reads_the_file_that_was_checked(tmp_path):
    """checked_name: a file swapped for another (a FIFO, say) after the check cannot be what is read."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    photo = shutil.copy(A, tmp_path / "photo.jpg")
    os.mkfifo(tmp_path / "fifo")
    with checked_name(photo) as name:
        os.replace(tmp_path / "fifo", photo)
        assert Path(name).read_bytes() == A.read_bytes()
    assert Path(photo).is_fifo()


def test_writes_that_fail_in_crops_are_one_line_each(tmp_path, capsys):
    """A crop whose folder cannot be made (a file where it should go): one line, the others are written."""
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    shutil.copy(A, inputs / "a" / A.name)
    shutil.copy(A, inputs / "b" / A.name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("mine")
    assert main(["crops", str(inputs), "-o", str(tmp_path / "out")]) == 1
    assert f"{inputs / 'a' / A.name}: cannot write its output" in one_error(capsys)
    assert (tmp_path / "out" / "a").read_text() == "mine" and (tmp_path / "out" / "b" / f"{A.stem}.png").is_file()


def test_a_link_to_a_photo_or_to_the_weights_is_never_an_output(small, small_weights, tmp_path, capsys):
    """The suffix rule holds for the file a link leads to, and identity build's --weights is an input."""
    victim = shutil.copy(A, tmp_path / "victim.jpg")
    (tmp_path / "evil.safetensors").symlink_to(victim)
    (tmp_path / "evil.onnx").symlink_to(victim)
    weights = shutil.copy(small_weights, tmp_path / "w.safetensors")
    for argv, message in (
        (["convert", str(small_weights), str(tmp_path / "evil.safetensors")], "which does not end in .safetensors"),
        (["export-onnx", str(tmp_path / "evil.onnx"), "--weights", str(small_weights)], "which does not end in .onnx"),
        (["identity", "build", *map(str, REFS), "-o", str(weights), "--weights", str(weights)], "is an input"),
    ):
        assert main(argv) == 2
        assert message in one_error(capsys)
    assert Path(victim).read_bytes() == A.read_bytes()
    assert Path(weights).read_bytes() == Path(small_weights).read_bytes()
    upper = tmp_path / "UP.SAFETENSORS"  # written by convert, so read by every loader, whatever the case
    assert main(["convert", str(small_weights), str(upper)]) == 0
    assert load_model(upper, device="cpu").net.fingerprint() == small.fingerprint()


def test_a_report_that_cannot_be_written_is_one_line(small_weights, tmp_path, capsys):
    """The outputs are written and journalled; the report's failure is one line (exit 2), not a traceback."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("needs /sys, where no one can create a file")
    out = tmp_path / "out"
    argv = ["restore", str(A), "-o", str(out), "--weights", str(small_weights), "--report", "/sys/dmdnet-r.json"]
    assert main(argv) == 2
    assert "/sys/dmdnet-r.json: cannot write the report" in one_error(capsys)
    assert (out / A.name).is_file()
    (tmp_path / "afile").write_text("mine")
    assert main(["crops", str(A), "-o", str(tmp_path / "afile" / "sub")]) == 2
    assert f"{tmp_path / 'afile'} is not a folder" in one_error(capsys)
