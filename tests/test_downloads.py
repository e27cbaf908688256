"""`weights.download_official` against real HTTP servers on 127.0.0.1 that misbehave: trickle, fall silent,
close early, or serve an empty body or a web page. Every way ends in one clear line, in bounded time,
with nothing left at the target."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmdnet_plugin import WeightsError, load_model
from dmdnet_plugin.cli import main
from dmdnet_plugin.weights import download_official, save_checkpoint

CLAIMED = 1000  # the Content-Length the misbehaving routes announce


@pytest.fixture(scope="module")
def checkpoint(small, tmp_path_factory) -> bytes:
    return save_checkpoint(small, tmp_path_factory.mktemp("ckpt") / "small.safetensors").read_bytes()


@pytest.fixture(scope="module")
def server(checkpoint) -> Iterator[str]:
    """A real HTTP server: /trickle sends a byte a second, /silent nothing after the headers, /cut half its
    announced length, /redirect-to/URL redirects; /small.safetensors, /empty and /page.html are served whole."""
    stop = threading.Event()
    files = {
        "/small.safetensors": checkpoint,
        "/empty": b"",
        "/page.html": b"<!DOCTYPE html>\n<html><body>Too many requests</body></html>",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/redirect-to/"):  # a server may not send the download elsewhere but http(s)
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/redirect-to/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(CLAIMED if body is None else len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hung up, as it should
                if body is not None:
                    self.wfile.write(body)
                elif self.path == "/cut":
                    self.wfile.write(b"x" * (CLAIMED // 2))
                elif self.path == "/trickle":
                    while not stop.wait(1.0):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                else:
                    stop.wait(60)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def _fails(url: str, target: Path, match: str, **limits) -> float:
    """Seconds until the download failed with ``match``; nothing may be left in the target's folder."""
    target.parent.mkdir(exist_ok=True)
    start = time.monotonic()
    with pytest.raises(WeightsError, match=match) as err:
        download_official(url, target, progress=lambda done, total: None, **limits)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"download from {url}")
    assert not list(target.parent.iterdir())  # no target, no partial file
    return time.monotonic() - start


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dmdnet-download"]


def test_a_valid_checkpoint_lands_and_loads(server, checkpoint, small, tmp_path):
    seen = []
    url, target = f"{server}/small.safetensors", tmp_path / "dl" / "small.safetensors"
    target = download_official(url, target, lambda done, total: seen.append((done, total)))
    assert target.read_bytes() == checkpoint and seen[-1] == (len(checkpoint), len(checkpoint))
    assert load_model(target, device="cpu").net.fingerprint() == small.fingerprint()


def test_a_trickle_is_too_slow_and_a_silent_server_has_no_data(server, tmp_path):
    target = tmp_path / "dl" / "DMDNet.pth"
    took = _fails(f"{server}/trickle", target, r"stopped: too slow: 0\.\d+ KiB/s over the last 2 s", window_s=2)
    assert 2 <= took < 3.5
    took = _fails(f"{server}/silent", target, r"stopped: no data for 1 s; nothing was kept", window_s=1)
    assert 1 <= took < 2.5


def test_the_deadline_holds_even_for_a_server_that_keeps_sending(server, tmp_path):
    took = _fails(
        f"{server}/trickle", tmp_path / "dl" / "x.pth", r"took longer than the deadline of 1\.5 s \(\d of 1000 bytes\)",
        deadline_s=1.5, min_rate_kib_s=0,
    )  # fmt: skip
    assert 1.5 <= took < 2.5


@pytest.mark.parametrize(
    "path, problem",
    [
        ("/empty", r"not a readable checkpoint \(empty file\)"),
        ("/page.html", r"not a readable checkpoint \(an HTML page, not a checkpoint"),
        ("/cut", r"stopped: the connection closed after 500 of 1000 bytes"),
    ],
)
def test_empty_cut_and_html_bodies_are_refused(server, tmp_path, path, problem):
    _fails(server + path, tmp_path / "dl" / "DMDNet.pth", problem)


def test_only_http_and_https_are_fetched_before_any_connection(server, tmp_path):
    (tmp_path / "secret.pth").write_bytes(b"x")
    port = server.rsplit(":", 1)[1]
    for i, url in enumerate((f"file://{tmp_path}/secret.pth", f"ftp://127.0.0.1:{port}/x", "data:,x", "secret.pth")):
        _fails(url, tmp_path / str(i) / "DMDNet.pth", "refused: only http:// and https:// URLs are fetched")
    for i, url in enumerate((f"file://{tmp_path}/secret.pth", f"ftp://127.0.0.1:{port}/x")):
        redirected = f"{server}/redirect-to/{url}"
        _fails(redirected, tmp_path / f"r{i}" / "DMDNet.pth", r"failed \(.*(not allowed|unknown url)")


def test_a_cancel_stops_a_silent_download_within_a_second(server, tmp_path):
    """The callback raises on its second call; the reader, blocked on a silent socket, is woken and ends."""
    calls = []

    def cancel(done: int, total: int | None) -> None:
        calls.append((done, total))
        if len(calls) > 1:
            raise KeyboardInterrupt

    target = tmp_path / "dl" / "DMDNet.pth"
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        download_official(f"{server}/silent", target, cancel)
    assert time.monotonic() - start < 1.0 and len(calls) == 2 and {done for done, _ in calls} == {0}
    assert not list(target.parent.iterdir())
    for _ in range(10):  # the reader was woken by the shut socket, not left waiting for 30 s
        if not _readers():
            break
        time.sleep(0.1)
    assert not _readers()


def test_the_cli_says_one_line_for_each_bad_download(server, tmp_path, capsys):
    for path, problem in (("/empty", "(empty file)"), ("/page.html", "an HTML page, not a checkpoint")):
        assert main(["weights", "download", "--url", server + path, "--to", str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err  # tqdm's bar, then the error
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: download from {server}{path}: ")
        assert problem in errors[0] and "Traceback" not in err
    assert main(["weights", "download", "--url", "file:///etc/passwd", "--to", str(tmp_path / "cache")]) == 2
    assert "only http:// and https://" in capsys.readouterr().err and not list((tmp_path / "cache").glob("*"))
