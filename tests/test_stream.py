"""The streaming photo pipeline and resumable runs, through the real CLI on real photos."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from photo_folders import CLI, PHOTOS, ROOT, folder, outputs, report, restore_args

from dmdnet_plugin.cli import main
from dmdnet_plugin.io import read_image
from dmdnet_plugin.journal import journal_path
from dmdnet_plugin.outputs import Job
from dmdnet_plugin.settings import RunSettings
from dmdnet_plugin.stream import CoreShare, PhotoStream


def test_the_overlapped_pipeline_gives_the_reference_paths_pixels_and_report(small_weights, tmp_path):
    """Threads around the model change when things happen, not what comes out (fp32)."""
    inputs = folder(tmp_path)
    runs = {}
    for workers in (0, 2):
        out, rep = tmp_path / f"out{workers}", tmp_path / f"r{workers}.json"
        status = main(restore_args(inputs, out, rep, small_weights, "--precision", "fp32", "--workers", str(workers)))
        assert status == 1  # the broken file; the rest went on
        runs[workers] = outputs(out), report(rep)
    assert runs[0] == runs[2]
    files, entries = runs[2]
    assert len(files) == len(PHOTOS) and [e["status"] for e in entries].count("ok") == len(PHOTOS)
    assert sum(len(e.get("faces", [])) for e in entries) >= 8 and "broken.png" in entries[-1]["error"]

    # several windows, through the Python API: faces of two photos share each model call
    settings = RunSettings.create(small_weights, "cpu", "fp32", detector="hog")
    restorer = settings.restorer()
    jobs = [Job(str(p), str(tmp_path / "api" / f"{w}" / p.name)) for w in (0, 2) for p in sorted(inputs.iterdir())]
    half = len(jobs) // 2
    threads, told = torch.get_num_threads(), []
    by = {
        w: list(PhotoStream(restorer, settings, workers=w, window=2).run(jobs[i : i + half], told.append))
        for w, i in ((0, 0), (2, half))
    }
    assert torch.get_num_threads() == threads  # the cores the stages had are the model's again
    assert sorted(map(id, told)) == sorted(id(e) for e in by[0] + by[2])  # done(entry): each entry, once
    for a, b in zip(by[0], by[2]):
        assert a.renamed(a.input, None) == b.renamed(b.input, None)
        if a.output:
            assert Path(a.output).read_bytes() == Path(b.output).read_bytes()
    assert read_image(jobs[0].dst).size == read_image(jobs[0].src).size


def test_the_model_leaves_a_core_to_each_busy_stage_batch_by_batch():
    """torch's threads meet after every op: with the reader on one of their cores, the model would
    run at that core's pace on all of them, so it gives each busy stage a core until it is idle."""
    threads, busy = torch.get_num_threads(), 0
    try:
        torch.set_num_threads(4)
        share = CoreShare(lambda: busy)
        assert torch.get_num_threads() == 4  # nothing busy: all four
        busy = 1
        share(4, 12)  # called as the model's progress, after each batch
        assert torch.get_num_threads() == 3
        busy = 6
        share(8, 12)
        assert torch.get_num_threads() == 1  # never fewer than one
        share.restore()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def _written(out: Path) -> set[str]:
    """The outputs in ``out`` (written whole, then renamed: a name without a dot is a whole file)."""
    return {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.is_dir() else set()


def _journaled(journal: Path) -> list[dict]:
    """The entries in a journal, but for a last line a kill cut short."""
    entries = []
    for line in journal.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            entries += [record["entry"]] if "entry" in record else []  # not a run's start
    return entries


def test_a_killed_run_resumes_with_only_what_is_missing(small_weights, tmp_path, monkeypatch):
    """SIGKILL in the middle, the same command again: the finished outputs stay as they are, the rest
    is restored, nothing partial is left, and the one report covers every input.

    Each output is journaled by the thread that wrote it, right after: at the kill, at most the
    writes then in flight (one per writer thread) are whole but not yet in the journal."""
    inputs = folder(tmp_path, copies=4)
    out, rep = tmp_path / "out", tmp_path / "report.json"
    cmd = [*CLI, *restore_args(inputs, out, rep, small_weights)]
    monkeypatch.setenv("DMDNET_CACHE", str(tmp_path / "cache"))  # the runs' journals; inherited by the runs
    first = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    journal = journal_path(out)
    deadline = time.monotonic() + 300
    while len(_written(out)) < 12:  # most of the second window written; the third being restored
        assert first.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    whole = _written(out)
    for name in whole:  # every output there is whole
        assert read_image(out / name).size == read_image(inputs / name).size
    journaled = {Path(e["output"]).name for e in _journaled(journal) if e["status"] != "error"}
    assert journaled and journaled <= whole and len(whole - journaled) <= 2  # one write in flight per writer
    kept = {name: (out / name).stat().st_mtime_ns for name in journaled}
    total = len(PHOTOS) * 4 + 1
    assert len(whole) < total - 1 and not rep.exists()

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1, second.stderr[-2000:]  # the broken file, again
    assert f"of {total} inputs already restored by an earlier run" in second.stderr
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())  # not restored again
    entries = report(rep)
    assert [e["input"] for e in entries] == [str(p) for p in sorted(inputs.iterdir())]
    assert [e["status"] for e in entries].count("ok") == total - 1
    assert not [p for p in out.iterdir() if ".part" in p.name]

    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert f"{total - 1} of {total} inputs already restored" in third.stderr and report(rep) == entries
