"""Runs never lose or misstate a photo: cleanup, resume, sub-folders, the lock, messages, the report.

Real photos, real files, the real CLI (in-process, and in other processes where two runs meet).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, small_net
from photo_folders import CLI, ROOT
from report_schema import checked

from dmdnet_plugin.cli import build_parser, main
from dmdnet_plugin.io import read_image
from dmdnet_plugin.journal import journal_path
from dmdnet_plugin.report import Status
from dmdnet_plugin.runs import RunStart, restore_files
from dmdnet_plugin.settings import RunSettings
from dmdnet_plugin.weights import save_checkpoint

A, B, C = DATA / "lq" / "00005_17.jpg", DATA / "lq" / "00022_14.jpg", DATA / "celebref" / "00005" / "3.jpg"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's journals in its own cache folder (and the runs it starts inherit it)."""
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))


def restore(inputs, out, weights, *extra) -> int:
    command = ["restore", *inputs, "-o", out, "--weights", weights, "--precision", "fp32", *extra]
    return main([str(a) for a in command])


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_start_up_cleanup_deletes_no_user_file(small_weights, tmp_path, capsys):
    """Only the temporary files of the project's own killed writes are removed: never a user's file
    that looks like one, in the inputs or in the output folder, nor a folder of that name."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(A, inputs / "a.jpg")
    shutil.copy(B, inputs / ".holiday.part2.jpg")  # a hidden photo of the user's
    assert restore([inputs], inputs, small_weights) == 1  # -o the inputs: every file refused...
    assert (inputs / ".holiday.part2.jpg").read_bytes() == B.read_bytes()  # ...and nothing deleted
    assert "would overwrite the input" in errors(capsys)[0]

    out = tmp_path / "out"
    (out / ".project.parts").mkdir(parents=True)
    (out / ".thesis.part2.docx").write_text("three years of work")
    link = tmp_path / "linked"
    link.symlink_to(inputs)
    assert restore([inputs], link, small_weights) == 1  # -o a link to the inputs: refused the same way
    assert restore([inputs / "a.jpg"], out, small_weights) == 0
    assert (out / ".thesis.part2.docx").read_text() == "three years of work" and (out / ".project.parts").is_dir()
    assert (inputs / ".holiday.part2.jpg").is_file() and (out / "a.jpg").is_file()


def test_a_killed_write_leaves_a_temporary_file_the_next_run_removes(small_weights, tmp_path):
    """A run's temporary files carry its token, which its journal holds: the next run into the folder
    removes exactly those, whatever else is there."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os
        from dmdnet_plugin.atomic import atomic_path
        from dmdnet_plugin.journal import Journal, LocalFiles
        with Journal({str(out)!r}, "k", LocalFiles()):
            with atomic_path({str(out / "sub" / "a.jpg")!r}) as tmp:
                tmp.write_bytes(b"half a photo")
                os._exit(9)  # killed in the middle of the write
        """
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT).returncode == 9
    (left,) = [p for p in (out / "sub").iterdir()]
    assert left.name.startswith(".a.jpg.dmdnet-") and ".part" in left.name
    (out / "sub" / f".a.jpg.dmdnet-{'0' * 16}-abc.part.jpg").write_text("not ours: another token")
    assert restore([A], out, small_weights) == 0
    assert sorted(p.name for p in (out / "sub").iterdir()) == [f".a.jpg.dmdnet-{'0' * 16}-abc.part.jpg"]


def test_resume_restores_again_what_changed(small_weights, tmp_path, capsys):
    """An input replaced (even by another photo of the same size and time), an output emptied or broken,
    other weights copied over the same file: each is restored again, and only that."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, photo in (("a.jpg", A), ("b.jpg", B), ("c.jpg", C)):
        shutil.copy(photo, inputs / name)
    weights = tmp_path / "w.safetensors"
    shutil.copy(small_weights, weights)
    assert restore([inputs], out, weights) == 0
    first = {p.name: read_image(p).pixels.astype(int) for p in out.iterdir()}
    times = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def near(name: str, before: str) -> bool:
        """The same restoration (a face restored in another batch may differ by a level or two)."""
        return np.abs(read_image(out / name).pixels - first[before]).mean() < 0.5

    def again(expected: int) -> set[str]:
        capsys.readouterr()
        assert restore([inputs], out, weights) == 0
        err = capsys.readouterr().err
        assert f"({expected} of them again" in err if expected else "already restored" not in err
        redone = {p.name for p in out.iterdir() if p.stat().st_mtime_ns != times[p.name]}
        times.update({p.name: p.stat().st_mtime_ns for p in out.iterdir()})
        return redone

    # another photo under the same name: a.jpg becomes C's pixels
    shutil.copy(C, inputs / "a.jpg")
    assert again(1) == {"a.jpg"} and near("a.jpg", "c.jpg") and not near("a.jpg", "a.jpg")
    # new content of the same size, with the old modification time put back
    stat = (inputs / "b.jpg").stat()
    data = bytearray((inputs / "b.jpg").read_bytes())
    at = next(i for i in range(len(data) // 2, len(data)) if data[i] < 0xF0)
    data[at] ^= 0x01  # one bit of the entropy-coded data: the same size, other content
    (inputs / "b.jpg").write_bytes(bytes(data))
    os.utime(inputs / "b.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (inputs / "b.jpg").stat().st_size == stat.st_size
    assert again(1) == {"b.jpg"}
    # an output cut to 0 bytes, one that does not decode, one zeroed inside (it still decodes)
    (out / "c.jpg").write_bytes(b"")
    (out / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg any more")
    with open(out / "a.jpg", "r+b") as f:
        f.seek(2000)
        f.write(bytes(3000))
    assert read_image(out / "a.jpg").size == read_image(C).size
    assert again(3) == {"a.jpg", "b.jpg", "c.jpg"} and near("c.jpg", "c.jpg") and near("a.jpg", "c.jpg")
    # another input written over an output: the first input's output no longer matches it
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(B, other / "c.jpg")
    assert restore([other / "c.jpg"], out, weights) == 0 and near("c.jpg", "b.jpg")
    times["c.jpg"] = (out / "c.jpg").stat().st_mtime_ns
    assert again(1) == {"c.jpg"} and near("c.jpg", "c.jpg")
    # other weights copied over the same file: every output again
    save_checkpoint(small_net(seed=1), weights)
    assert again(0) == {"a.jpg", "b.jpg", "c.jpg"} and not near("c.jpg", "c.jpg")


def test_same_named_photos_in_sub_folders_keep_their_paths(small_weights, tmp_path, capsys):
    """in/2019/img.jpg and in/2020/img.jpg: out/2019/img.jpg and out/2020/img.jpg, as cp -r does. Two
    files that would still share an output are refused, one line each, before any work."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    for year, photo in (("2019", A), ("2020", B)):
        (inputs / year).mkdir(parents=True)
        shutil.copy(photo, inputs / year / "img.jpg")
    (inputs / "out_inside").mkdir()
    assert restore([inputs], inputs / "out_inside", small_weights, "--report", tmp_path / "r.json") == 0
    written = inputs / "out_inside"
    assert sorted(str(p.relative_to(written)) for p in written.rglob("*.jpg")) == ["2019/img.jpg", "2020/img.jpg"]
    assert read_image(written / "2019" / "img.jpg").size == read_image(A).size
    assert (written / "2019" / "img.jpg").read_bytes() != (written / "2020" / "img.jpg").read_bytes()
    report = checked(tmp_path / "r.json")
    assert [Path(e["output"]).relative_to(written).as_posix() for e in report["files"]] == [
        "2019/img.jpg",
        "2020/img.jpg",
    ]
    # again: the outputs inside the input folder are not taken for inputs
    assert restore([inputs], inputs / "out_inside", small_weights) == 0
    assert "2 of 2 inputs already restored" in capsys.readouterr().err

    # -o a folder of the inputs that holds a photo of the same name: the user's photo is never overwritten
    shutil.copy(C, inputs / "img.jpg")  # its output would be in/2020/img.jpg, the user's photo
    code = restore([inputs], inputs / "2020", small_weights)
    (line,) = errors(capsys)
    assert code == 1 and "is a file this project did not write" in line and f"{inputs / 'img.jpg'}:" in line
    assert (inputs / "2020" / "img.jpg").read_bytes() == B.read_bytes()

    code = restore([inputs / "2019" / "img.jpg", inputs / "2020" / "img.jpg", C], out, small_weights)
    lines = errors(capsys)
    assert code == 1 and len(lines) == 2 and all("would have the same output as" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["3.jpg"]


def test_a_second_run_into_the_same_folder_stops_with_one_line(small_weights, tmp_path, capsys):
    """Two runs into one output folder at once: the second stops at once, and writes nothing."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import time
        from dmdnet_plugin.journal import Journal, LocalFiles
        with Journal({str(out)!r}, "other run", LocalFiles()):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert restore([A], out, small_weights) == 2
        (line,) = errors(capsys)
        assert f"another dmdnet run (process {holder.pid}) is writing into {out}" in line
        assert not out.exists() or not list(out.iterdir())
    finally:
        holder.kill()
        holder.wait()
    assert restore([A], out, small_weights) == 0  # the lock went with the process


def test_control_characters_in_names_stay_in_one_escaped_line(small_weights, tmp_path, capsys):
    """A file named to forge a second error line, or to send terminal escapes, prints as one line."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bad\nerror: fake.jpg").write_bytes(b"not a photo")
    (inputs / "bell\x07\x1b[2J.png").write_bytes(b"")
    assert restore([inputs], tmp_path / "out", small_weights) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and "bad\\nerror: fake.jpg" in lines[0] and "bell\\x07\\x1b[2J.png" in lines[1]


def test_the_python_call_resumes_and_reports(small_weights, tmp_path):
    """restore_files is the CLI's run without the CLI: resume, the report, and what it tells its caller."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(A, inputs / "a.jpg")
    (inputs / "broken.png").write_bytes(b"\x89PNG broken")
    settings = RunSettings.create(small_weights, "cpu", "fp32", strength=0.5)
    starts, entries = [], []
    report = restore_files([inputs], out, settings, report=tmp_path / "r.json", on_entry=entries.append)
    assert [e.status for e in report.files] == [Status.OK, Status.ERROR] and report.failed
    assert entries == list(report.files) and checked(tmp_path / "r.json")["settings"]["strength"] == 0.5
    again = restore_files([inputs], out, settings, on_start=starts.append)
    assert starts == [RunStart(inputs=2, kept=1, again=0, refused=())] and again.files == report.files
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        RunSettings.create(small_weights, "cpu", "fp32", strength=2)
    key = settings.key()
    assert RunSettings.create(small_weights, "cpu", "fp32", strength=0.5).key() == key
    assert RunSettings.create(small_weights, "cpu", "fp32", strength=0.4).key() != key
    assert json.loads(journal_path(out).read_text().splitlines()[0])["settings"] == key


def test_strength_blends_the_restored_faces(small_weights, tmp_path):
    """--strength 0 leaves the photo as it was; 1 is the restored face; the CLI now has it too."""
    for strength in ("0", "1"):
        assert restore([A], tmp_path / strength, small_weights, "--strength", strength, "--save-faces") == 0
    original, none, full = read_image(A).pixels, *(read_image(tmp_path / s / A.name).pixels for s in "01")
    decoded = read_image(tmp_path / "0" / "cropped_faces" / "00005_17_00.png")
    assert decoded.size == (512, 512)
    assert np.abs(none.astype(int) - original).mean() < np.abs(full.astype(int) - original).mean() / 4


def test_options_that_cannot_run_are_one_line(small_weights, tmp_path, capsys):
    """--detector retinaface without its weights, --device cuda without a GPU, a bad --strength."""
    cases = {
        ("--detector", "retinaface"): "retinaface needs its weights",
        ("--device", "cuda"): "torch sees no CUDA GPU",
        ("--strength", "1.5"): "strength must be between 0 and 1",
    }
    for extra, message in cases.items():
        assert restore([A], tmp_path / "out", small_weights, *extra) == 2
        (line,) = errors(capsys)
        assert message in line
    assert not (tmp_path / "out").exists()


def test_ray_takes_no_input_for_an_address():
    """`dmdnet restore --ray archive/ -o restored/`: archive/ is an input (the address has its own option)."""
    args = build_parser().parse_args(["restore", "--ray", "archive/", "-o", "restored/"])
    assert args.ray and args.inputs == ["archive/"] and args.ray_address is None
    args = build_parser().parse_args(["restore", "a/", "--ray", "--ray-address", "10.0.0.1:6379", "-o", "r/"])
    assert args.ray_address == "10.0.0.1:6379" and args.inputs == ["a/"]


def test_the_report_never_replaces_an_input_or_a_file_of_the_users(small_weights, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(A, inputs / "a.jpg")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "folder.json").mkdir()
    for report, message in (
        (inputs / "a.jpg", "would overwrite an input or an output"),
        (tmp_path / "notes.txt", "exists and is not a dmdnet report"),
        (tmp_path / "folder.json", "is a folder"),
    ):
        assert restore([inputs], tmp_path / "out", small_weights, "--report", report) == 2
        (line,) = errors(capsys)
        assert message in line
    assert (inputs / "a.jpg").read_bytes() == A.read_bytes() and (tmp_path / "notes.txt").read_text() == "mine"
    assert restore([inputs], tmp_path / "out", small_weights, "--report", tmp_path / "r.json") == 0
    assert restore([inputs], tmp_path / "out", small_weights, "--report", tmp_path / "r.json") == 0  # its own


def test_a_cache_that_cannot_hold_the_journal_is_one_line(small_weights, tmp_path, capsys, monkeypatch):
    """A cache folder that is a file, or a journal with bytes gone wrong: one line, or a run that goes on."""
    (tmp_path / "not_a_folder").write_text("x")
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "not_a_folder"))
    assert restore([A], tmp_path / "out", small_weights) == 2
    (line,) = errors(capsys)
    assert "cannot keep the run's journal" in line and "DMDNET_CACHE" in line
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))
    assert restore([A], tmp_path / "out", small_weights) == 0
    with open(journal_path(tmp_path / "out"), "ab") as f:
        f.write(b"\xff\xfe garbage\n{not json\n")
    assert restore([A], tmp_path / "out", small_weights) == 0
    assert "1 of 1 inputs already restored" in capsys.readouterr().err


def test_values_no_run_can_use_and_long_names(small_weights, tmp_path, capsys):
    """NaN and infinite numbers are refused up front (a report must stay JSON); a name near the file
    system's limit still gets its temporary file; the weights' name is escaped like any other."""
    for option, value in (("--threshold", "nan"), ("--margin", "inf"), ("--upscale", "0.001"), ("--device", "mps")):
        assert restore([A], tmp_path / "out", small_weights, option, value) == 2
        assert len(errors(capsys)) == 1
    long = tmp_path / "in" / ("L" * 240 + ".jpg")
    long.parent.mkdir()
    shutil.copy(A, long)
    assert restore([long], tmp_path / "out", small_weights) == 0 and (tmp_path / "out" / long.name).is_file()
    odd = tmp_path / "w\x1b[7m\nerror: fake.safetensors"
    shutil.copy(small_weights, odd)
    assert restore([A], tmp_path / "out2", odd) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and not any(line.startswith("error:") for line in err.splitlines())


def test_a_fifo_a_device_or_a_huge_file_is_one_line_and_the_batch_goes_on(small_weights, tmp_path):
    """A FIFO named like a photo used to hang the run for good (a worker thread waited in ``open`` for a
    writer, deaf to SIGTERM), /dev/zero never ended, and a sparse file was read whole before its header was
    looked at. In their own process, so that a hang fails the test instead of stopping the suite."""
    odd = tmp_path / "odd"
    odd.mkdir()
    os.mkfifo(odd / "fifo.jpg")
    (odd / "zero.jpg").symlink_to("/dev/zero")
    with open(odd / "huge.png", "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    os.mkfifo(tmp_path / "fifo.json")
    os.mkfifo(tmp_path / "fifo.safetensors")
    out = tmp_path / "out"
    base = [*CLI, "restore", "-o", str(out), "--weights", str(small_weights), "--precision", "fp32"]
    photos = [str(A), str(odd / "fifo.jpg"), str(odd / "zero.jpg"), str(odd / "huge.png")]
    proc = subprocess.run([*base, *photos], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [
        f"error: {odd / 'fifo.jpg'}: not a regular file",
        f"error: {odd / 'zero.jpg'}: not a regular file",
        f"error: {odd / 'huge.png'}: 3072 MiB, more than the limit of 2048 MiB",
    ]
    assert (out / A.name).is_file()
    for extra, message in (
        (["--report", str(tmp_path / "fifo.json")], "fifo.json: not a regular file"),
        (["--identity", str(tmp_path / "fifo.safetensors")], "fifo.safetensors: not a readable identity"),
    ):
        proc = subprocess.run([*base, str(A), *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
        assert "not a regular file" in lines[0]
