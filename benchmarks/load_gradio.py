"""Load test of the Gradio demo: concurrent clients against the real app on 127.0.0.1.

    python benchmarks/load_gradio.py [--clients 8] [--requests 3] [--burst 24] [--weights PATH]

Starts ``gradio_app.py`` in its own process and sends, from ``--clients`` threads with their own
``gradio_client``, ``--requests`` restorations each, cycling through generic, with references,
and a broken upload. Each client sends a different face, and each result is checked against that
client's own input: the restored photo must be nearest (PSNR) to the photo that client sent. Then
a burst of ``--burst`` simultaneous requests overfills the queue (16 places) to record what a
rejected user sees. Everything is bounded by ``--deadline`` seconds and stops by itself. Prints a
table: completed, failed (with messages), rejected by the queue, latency percentiles, peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dmdnet_plugin.face_helper import MIN_FACE

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT / "tests" / "data" / "heldout"  # 2 people, 4 photos each (tests/data/SOURCES.md)
KINDS = ("generic", "references", "broken")


@contextlib.contextmanager
def serve(
    weights: str | None = None, log_path: Path | None = None, timeout: float = 120, extra: tuple[str, ...] = ()
) -> Iterator[tuple[str, int]]:
    """Run ``gradio_app.py`` (with ``extra`` arguments) on a free port of 127.0.0.1; yield (url, pid);
    stop it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path or os.devnull, "w")
    cmd = [sys.executable, str(ROOT / "gradio_app.py"), "--port", str(port), "--device", "cpu", *extra]
    proc = subprocess.Popen(
        cmd + (["--weights", str(weights)] if weights else []),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        start = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - start > timeout:
                    raise RuntimeError(f"gradio_app.py did not start (see {log_path})") from None
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return 0.0
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass
class Outcome:
    client: int
    kind: str
    seconds: float
    status: str  # ok | refused (a clear message for a broken file) | rejected (queue full) | failed | mixed
    message: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    peak_mb: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def client_inputs() -> list[tuple[Path, list[Path]]]:
    """(photo, two references of the same person) for each face of the held-out set."""
    out = []
    for person in sorted(p for p in FACES.iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        out += [(p, [r for r in photos if r != p][:2]) for p in photos]
    return out


def one_request(
    url: str,
    client,
    index: int,
    kind: str,
    photo: Path,
    refs: list[Path],
    broken: Path,
    everyone: list[np.ndarray],
    report: Report,
) -> None:
    from gradio_client import handle_file

    start = time.monotonic()
    try:
        args = (
            handle_file(str(broken if kind == "broken" else photo)),
            [handle_file(str(r)) for r in refs] if kind == "references" else None,
            None,
            "auto" if kind == "references" else "generic",
            1,
            1.0,
            False,
            0.52,
            0.05,
            True,
            MIN_FACE,
        )
        result_file = client.predict(*args, api_name="/restore")[4]
        got = cv2.imread(result_file)
        scores = [psnr(got, theirs) for theirs in everyone]
        mine = int(np.argmax(scores))
        status = "ok" if kind != "broken" and mine == index and scores[mine] > 20 else "mixed"
        message = "" if status == "ok" else f"result nearest to client {mine}'s photo ({scores[mine]:.1f} dB)"
    except Exception as exc:  # what gradio_client raises is what the user saw on the page
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        queue_full = "queue is full" in message.lower()
        status = "rejected" if queue_full else "refused" if kind == "broken" else "failed"
    report.add(Outcome(index, kind, time.monotonic() - start, status, message))


def run_load(url: str, pid: int, clients: int, requests: int, burst: int, deadline: float) -> Report:
    """Concurrent clients, then a burst; bounded by ``deadline`` seconds from the start."""
    from gradio_client import Client

    inputs = client_inputs()
    everyone = [cv2.imread(str(inputs[i % len(inputs)][0])) for i in range(clients)]
    broken = Path(tempfile.mkdtemp(prefix="dmdnet_load_")) / "broken.png"
    broken.write_bytes(b"this is not a picture\n" * 40)
    report = Report()
    end = time.monotonic() + deadline

    def session(index: int) -> None:
        client = Client(url, verbose=False)
        photo, refs = inputs[index % len(inputs)]
        for r in range(requests):
            if time.monotonic() > end:
                break
            one_request(url, client, index, KINDS[(index + r) % len(KINDS)], photo, refs, broken, everyone, report)

    with ThreadPoolExecutor(clients) as pool:
        wait([pool.submit(session, i) for i in range(clients)], timeout=max(1.0, end - time.monotonic()))
    if burst and time.monotonic() < end:
        shared = Client(url, verbose=False)
        with ThreadPoolExecutor(burst) as pool:
            futures = [
                pool.submit(
                    one_request,
                    url,
                    shared,
                    i % clients,
                    "generic",
                    inputs[i % clients % len(inputs)][0],
                    [],
                    broken,
                    everyone,
                    report,
                )
                for i in range(burst)
            ]
            wait(futures, timeout=max(1.0, end - time.monotonic()))
    report.peak_mb = peak_rss_mb(pid)
    return report


def summary(report: Report) -> str:
    """The table docs/reliability.md quotes."""
    times = np.array([o.seconds for o in report.outcomes if o.status == "ok"])
    counts = Counter(o.status for o in report.outcomes)
    pct = (lambda q: f"{np.percentile(times, q):.1f} s") if len(times) else (lambda q: "-")
    rows = [
        ("requests", str(len(report.outcomes))),
        ("completed (result checked against the sender's photo)", str(counts["ok"])),
        ("broken uploads refused with a message", str(counts["refused"])),
        ("rejected by the full queue", str(counts["rejected"])),
        ("failed", str(counts["failed"])),
        ("result given to the wrong client", str(counts["mixed"])),
        ("latency p50 / p90 / max (completed)", f"{pct(50)} / {pct(90)} / {pct(100)}"),
        ("server peak memory", f"{report.peak_mb:.0f} MiB"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    for status in ("refused", "rejected", "failed", "mixed"):
        seen = Counter(o.message for o in report.outcomes if o.status == status)
        lines += [f"- {status}: {msg!r} x{n}" for msg, n in seen.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="restorations per client")
    parser.add_argument("--burst", type=int, default=24, help="simultaneous requests after the clients (0: none)")
    parser.add_argument("--deadline", type=float, default=600, help="stop sending after this many seconds")
    parser.add_argument("--weights", help="checkpoint (default: the app's discovery order)")
    parser.add_argument("--log", type=Path, help="write the server's log here")
    args = parser.parse_args()
    with serve(args.weights, args.log) as (url, pid):
        start = time.monotonic()
        report = run_load(url, pid, args.clients, args.requests, args.burst, args.deadline)
        print(
            f"{args.clients} clients x {args.requests} requests, then a burst of {args.burst}, "
            f"in {time.monotonic() - start:.0f} s; {os.cpu_count()} CPUs"
        )
    print(summary(report))
    bad = [o for o in report.outcomes if o.status in ("failed", "mixed")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
