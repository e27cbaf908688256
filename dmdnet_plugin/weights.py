"""Checkpoints: find them, load them safely, convert them.

Three formats load without flags: the authors' ``DMDNet.pth`` (a plain state dict),
our ``.safetensors`` (configuration in the metadata) and BasicSR ``.pth`` files
(``params_ema`` / ``params``). ``.pth`` files are read with ``weights_only=True``: a
checkpoint from the internet must never run code when it is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from .atomic import atomic_path
from .identity import IdentityDictionary
from .model import KEY_SCALE, DMDNet
from .runtime import cache_dir, pick_device, pick_precision, tune_cpu_allocator
from .tensorfile import TensorFileError, check_tensors, json_field, read_safetensors
from .text import printable
from .userfiles import checked_name, open_regular, unreadable

OFFICIAL_URL = "https://github.com/csxmli2016/DMDNet/releases/download/v1/DMDNet.pth"
OFFICIAL_NAME = "DMDNet.pth"
URL_ENV = "DMDNET_WEIGHTS_URL"  # a mirror of the authors' file, for `dmdnet weights download` and ComfyUI
CHECKPOINT_FORMAT = "dmdnet-checkpoint"
CHECKPOINT_VERSION = 1
MAX_HEADER = 8 << 20  # the authors' configuration has about 1,000 tensors: a header of about 150 kB
# The demo checkpoint that ships inside the package (docs/training_demo.md says how it was made).
BUNDLED = Path(__file__).resolve().parent / "data" / "dmdnet_demo.safetensors"
BUNDLED_SHA256 = "be2788331039e4414475564d2e082033208429a0e62a934c29ebb13feb45ef81"
DEMO_NOTE = (
    "using the small bundled demo model (trained on a CPU on a few hundred faces, far below the "
    "authors' weights); run `dmdnet weights download` for the authors' DMDNet.pth"
)
# Download limits for the authors' file (150.8 M float32 parameters: about 603 MB) on a slow home line.
# The deadline lets any line faster than about 450 kbit/s finish (a 1 Mbit/s line takes 80 minutes);
# the minimum rate only catches stalls and trickles, measured over a window that is also the grace
# period before the first check.
DOWNLOAD_DEADLINE_S = 3 * 3600.0
DOWNLOAD_MIN_RATE_KIB_S = 8.0
DOWNLOAD_WINDOW_S = 60.0
MAX_CHECKPOINT_BYTES = 2 << 30  # no DMDNet checkpoint is larger; a file or a download beyond it is refused
_SOCKET_TIMEOUT_S = 30.0  # per socket operation; bounds a connect or a TLS handshake, which cannot be woken
_POLL_S = 0.2  # how often a waiting download checks its limits and calls progress (which may cancel it)
_SCHEMES = ("http", "https")


class WeightsError(RuntimeError):
    """A checkpoint is missing or unusable; the message says which file and why."""


@dataclass(frozen=True)
class WeightsSource:
    """Which checkpoint a model came from and why it was chosen, for logs, reports and pages."""

    path: Path
    origin: str  # "--weights", "DMDNET_WEIGHTS", "cache" or "bundled demo"

    @property
    def is_demo(self) -> bool:
        return self.origin == "bundled demo"

    def record(self) -> dict:
        return {"path": str(self.path), "origin": self.origin, "demo": self.is_demo}

    def notice(self) -> str:
        """What every surface tells its user: the file, and for the demo model how to get the real one."""
        text = f"weights: {printable(self.path)} ({self.origin})"
        return f"{text}\nnote: {DEMO_NOTE}" if self.is_demo else text


def sha256_of(path: Path) -> str:
    """The checkpoint's sha256, after its size is checked: a sparse 20 GB file took 50 s to hash."""
    digest = hashlib.sha256()
    try:
        with open_regular(path, MAX_CHECKPOINT_BYTES) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise WeightsError(f"{printable(path)}: {_unreadable(exc)}") from None
    return digest.hexdigest()


def _unreadable(exc: OSError) -> str:
    return "weights file not found" if isinstance(exc, FileNotFoundError) else unreadable(exc)


def find_weights(explicit: str | Path | WeightsSource | None = None) -> WeightsSource:
    """Resolve the checkpoint: explicit path, ``$DMDNET_WEIGHTS``, the cache, then the bundled demo
    (a source already resolved is kept, with its origin).

    Never touches the network: ``dmdnet weights download`` fetches the authors' file on request.
    """
    if isinstance(explicit, WeightsSource):
        return explicit
    for origin, value in (("--weights", explicit), ("DMDNET_WEIGHTS", os.environ.get("DMDNET_WEIGHTS"))):
        if value:
            path = Path(value).expanduser()
            try:
                open_regular(path).close()  # judged by stat first: a FIFO is not opened
            except OSError as exc:
                raise WeightsError(f"{printable(path)}: {_unreadable(exc)} (given by {origin})") from None
            return WeightsSource(path, origin)
    for path in sorted(cache_dir().glob("*.safetensors")) + [cache_dir() / OFFICIAL_NAME]:
        if path.is_file():
            return WeightsSource(path, "cache")
    if BUNDLED.is_file():
        if sha256_of(BUNDLED) != BUNDLED_SHA256:
            raise WeightsError(
                f"{BUNDLED}: the bundled demo checkpoint is damaged (sha256 differs); reinstall "
                "the package, or pass --weights PATH"
            )
        return WeightsSource(BUNDLED, "bundled demo")
    raise WeightsError(
        f"no DMDNet weights found: run `dmdnet weights download` (fetches {OFFICIAL_NAME} into "
        f"{cache_dir()}), or put it there yourself, or pass --weights PATH, or set DMDNET_WEIGHTS=PATH"
    )


def official_url() -> str:
    """Where the authors' checkpoint is fetched from: ``$DMDNET_WEIGHTS_URL`` (a mirror), else their release."""
    return os.environ.get(URL_ENV) or OFFICIAL_URL


def download_official(
    url: str | None = None,
    target: Path | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    min_rate_kib_s: float = DOWNLOAD_MIN_RATE_KIB_S,
    window_s: float = DOWNLOAD_WINDOW_S,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
) -> Path:
    """Fetch the authors' checkpoint (from :func:`official_url` by default) into the cache, atomically.

    ``progress(bytes done, bytes in all or None)`` replaces the terminal progress bar (ComfyUI
    shows its own); it is called at least every 0.2 s, data or not, so an exception it raises (a
    cancel) stops the download within that time and propagates unchanged. The download stops with
    a :class:`WeightsError` after ``deadline_s``, or when less than ``min_rate_kib_s`` arrived over
    the last ``window_s`` (checked from ``window_s`` on). Only http and https are fetched. The
    integrity check is a strict load (every tensor name and shape of the configuration the file
    claims): a partial, HTML or foreign file never reaches the target.
    """
    url = url or official_url()
    source = f"download from {printable(url)}"
    if urllib.parse.urlsplit(url).scheme.lower() not in _SCHEMES:
        raise WeightsError(f"{source} refused: only http:// and https:// URLs are fetched")
    target = target or cache_dir() / OFFICIAL_NAME
    pace = _Pace(deadline_s, min_rate_kib_s * 1024, window_s, max_bytes)
    try:
        with atomic_path(target) as tmp, _progress_or_bar(progress, target.name) as report:
            with open(tmp, "wb") as out:
                _fetch(url, out, report, pace)
            state, config = read_state_dict(tmp, source=source)
            build_model(state, config, source=source)
    except _Stop as exc:
        raise WeightsError(f"{source} stopped: {exc}; nothing was kept") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise WeightsError(f"{source} failed ({printable(exc)})") from None
    return target


class _Stop(Exception):
    """A download limit was hit; the message says which."""


@dataclass
class _Pace:
    """The limits of one download: an overall deadline, a size cap, and a minimum rate over a sliding window."""

    deadline_s: float
    min_rate: float  # bytes per second
    window_s: float
    max_bytes: int
    start: float = field(default_factory=time.monotonic)
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (time, bytes done), the window's start on

    def __post_init__(self) -> None:
        self.samples.append((self.start, 0))

    def check(self, done: int, total: int | None) -> None:
        """Raise :class:`_Stop` when the download must end now."""
        now = time.monotonic()
        self.samples.append((now, done))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()
        if max(done, total or 0) > self.max_bytes:
            raise _Stop(f"more than {self.max_bytes} bytes, far more than a DMDNet checkpoint")
        if now - self.start > self.deadline_s:
            raise _Stop(f"took longer than the deadline of {self.deadline_s:g} s ({done} of {total or '?'} bytes)")
        then, before = self.samples[0]
        if now - then >= self.window_s and done - before < self.min_rate * (now - then):
            if done == before:
                raise _Stop(f"no data for {self.window_s:g} s")
            rate = (done - before) / (now - then) / 1024
            raise _Stop(
                f"too slow: {rate:.3g} KiB/s over the last {self.window_s:g} s "
                f"(the minimum is {self.min_rate / 1024:g} KiB/s)"
            )


def _fetch(url: str, out: BinaryIO, report: Callable[[int, int | None], None], pace: _Pace) -> None:
    """Copy ``url`` into ``out`` while a reader thread waits on the network.

    A thread blocked in a socket read notices neither a deadline nor a cancel, so this thread
    checks both every ``_POLL_S`` and, when it gives up, shuts the sockets down to wake the reader.
    """
    events: queue.Queue = queue.Queue()
    sockets = _Sockets()
    threading.Thread(target=_read, args=(url, events, sockets), name="dmdnet-download", daemon=True).start()
    done, total, reported = 0, None, 0.0
    try:
        while True:
            try:
                kind, value = events.get(timeout=_POLL_S)
            except queue.Empty:
                kind, value = "wait", None
            if kind == "error":
                raise value
            if kind == "size":
                total = value
            elif kind == "data":
                done += out.write(value)
            elif kind == "end" and total is not None and done < total:
                raise _Stop(f"the connection closed after {done} of {total} bytes")
            pace.check(done, total)
            if kind != "data" or time.monotonic() - reported >= _POLL_S:
                report(done, total)
                reported = time.monotonic()
            if kind == "end":
                return
    finally:
        sockets.shut()


def _read(url: str, events: queue.Queue, sockets: _Sockets) -> None:
    """The reader thread: ("size", Content-Length or None), ("data", bytes)..., then ("end" or "error", ...)."""
    try:
        with _opener(sockets).open(url, timeout=_SOCKET_TIMEOUT_S) as response:
            events.put(("size", int(response.headers.get("Content-Length") or 0) or None))
            while not sockets.is_shut() and (chunk := response.read1(1 << 16)):
                events.put(("data", chunk))
        events.put(("end", None))
    except Exception as exc:  # anything: the waiting thread decides what it means
        events.put(("error", exc))


class _Sockets:
    """The sockets one download opened. Shutting a socket down is the one way to wake a thread blocked
    reading it; one connected after :meth:`shut` is shut at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._shut = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.append(sock)
            if self._shut:
                self._close(sock)

    def shut(self) -> None:
        with self._lock:
            self._shut = True
            for sock in self._open:
                self._close(sock)

    def is_shut(self) -> bool:
        return self._shut

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    """urllib for http and https only (redirects and proxies included), recording each socket it connects."""

    def recorded(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Connection(base):
            def connect(self) -> None:
                super().connect()
                sockets.add(self.sock)

        return Connection

    http_connection, https_connection = recorded(http.client.HTTPConnection), recorded(http.client.HTTPSConnection)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(http_connection, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(https_connection, req)  # the default, certificate-checking context

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),  # a redirect to ftp:// is "unknown url type", not a crash
        Http(),
        Https(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def _progress_or_bar(progress: Callable[[int, int | None], None] | None, name: str) -> Iterator[Callable]:
    """``progress`` itself, or a callback drawing tqdm's bar on the terminal."""
    if progress is not None:
        yield progress
        return
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:  # not `bar or`: a tqdm bar of total 0 is falsy
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=name)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


_MARKUP = re.compile(rb"\s*<(\?xml|!doctype html|html|head|body)", re.IGNORECASE)


def _plain_problem(path: str) -> str | None:
    """What is wrong with a file whose decoder would say it badly: torch.load reports an empty file as
    an empty EOFError, a web page as an unpickling refusal and a cut zip as a miniz error."""
    with open(path, "rb") as f:
        head = f.read(256)
        size = f.seek(0, 2)
    if size == 0:
        return "empty file"
    if markup := _MARKUP.match(head.removeprefix(b"\xef\xbb\xbf")):
        page = "an XML document" if markup.group(1) == b"?xml" else "an HTML page"
        return f"{page}, not a checkpoint: a web page was saved in place of the file"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"truncated or corrupt: a zip archive of {size} bytes without the directory that ends it"
    return None


def _first_sentence(exc: BaseException) -> str:
    """The exception's type and the first sentence of its message (torch's run to several lines of advice)."""
    text = (str(exc).splitlines() or [""])[0].split(". ")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_state_dict(path: str | Path, source: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """State dict and stored configuration (None when the file has none) of any supported file.

    Errors name ``source`` (the path by default) and say in one line what is wrong with the file.
    """
    path = Path(path)
    source = source or printable(path)
    try:
        with checked_name(path, MAX_CHECKPOINT_BYTES) as name:
            if problem := _plain_problem(name):
                raise WeightsError(f"{source}: not a readable checkpoint ({problem})")
            if path.suffix.lower() == ".safetensors":
                state, meta = read_safetensors(Path(name), MAX_HEADER)
                config = json_field(meta, "config") if "config" in meta else None
                return state, config if isinstance(config, dict) else None
            obj = torch.load(name, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise WeightsError(f"{source}: {_unreadable(exc)}") from None
    except WeightsError:
        raise
    except TensorFileError as exc:
        raise WeightsError(f"{source}: not a readable checkpoint (truncated or corrupt safetensors: {exc})") from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise WeightsError(
            f"{source}: not a readable checkpoint (truncated or corrupt: {_first_sentence(exc)})"
        ) from None
    except Exception as exc:  # torch.load: zip, pickle and weights_only refusals each have their own type
        raise WeightsError(f"{source}: not a readable checkpoint ({_first_sentence(exc)})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: expected a state dict, found {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    for key in ("params_ema", "params"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{source}: holds no tensors")
    return state, config


def infer_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The constructor arguments that produce these tensor shapes."""
    try:
        config = {"ngf": state["E_lq.conv1.0.weight_orig"].shape[0], "banks_num": state["le_256_mem_key"].shape[0]}
    except KeyError as exc:
        raise WeightsError(f"not a DMDNet state dict (no {exc})") from None
    except IndexError:
        raise WeightsError("not a DMDNet state dict (scalar where a weight should be)") from None
    if config["ngf"] < KEY_SCALE or config["ngf"] % KEY_SCALE or config["banks_num"] < 1:
        raise WeightsError(f"not a DMDNet state dict (it implies {config})")
    return config


def build_model(state: dict[str, torch.Tensor], config: dict | None = None, source: str = "state dict") -> DMDNet:
    """A DMDNet holding ``state``, loaded strictly with a readable report of any mismatch.

    Shapes are checked on a meta-device net first, so a file can never make us allocate a model
    larger than itself; every tensor must be finite. The stored configuration, when there is one,
    must agree with the shapes.
    """
    try:
        inferred = infer_config(state)
        if config is not None and config != inferred:
            raise WeightsError(f"its stored configuration {config} does not match its tensors {inferred}")
        check_tensors(state)
    except (WeightsError, TensorFileError) as exc:
        raise WeightsError(f"{source}: {exc}") from None
    with torch.device("meta"):
        model = DMDNet(**inferred)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:

        def show(items: list[str]) -> str:
            return f"{len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"

        raise WeightsError(
            f"{source}: does not match DMDNet{model.config}: missing {show(missing)}, "
            f"unexpected {show(unexpected)}, wrong shape {show(wrong)}"
        )
    # fresh, aligned fp32 copies: views into a loaded file can take slower, differently rounding kernels
    model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, strict=True, assign=True)
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference, with where its weights came from and the precision it runs in.

    The ``nn.Module`` itself carries neither: it stays a plain DMDNet that training, the
    benchmarks and the tests use as it is. ``source`` is None for a net built in code.
    """

    net: DMDNet
    dtype: torch.dtype = torch.float32  # the compute precision (autocast); the weights stay float32
    source: WeightsSource | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def restore(
        self, lq: torch.Tensor, boxes: torch.Tensor, identity: IdentityDictionary | None = None
    ) -> torch.Tensor:
        """:meth:`DMDNet.restore` in this model's precision."""
        return self.net.restore(lq, boxes, identity, dtype=self.dtype)

    def encode_identity(self, refs: torch.Tensor, ref_boxes: torch.Tensor, **options) -> IdentityDictionary:
        """:meth:`DMDNet.encode_identity` in this model's precision."""
        return self.net.encode_identity(refs, ref_boxes, dtype=self.dtype, **options)

    def notice(self) -> str:
        """What every surface tells its user about the weights."""
        return "weights: built in code" if self.source is None else self.source.notice()

    def record(self) -> dict | None:
        return None if self.source is None else self.source.record()


def load_model(
    path: str | Path | WeightsSource | None = None,
    device: str | torch.device | None = None,
    precision: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a checkpoint (found by :func:`find_weights` when ``path`` is None) for inference.

    ``device`` and ``precision`` (the compute precision of :meth:`DMDNet.restore`, by autocast)
    default to :mod:`runtime`'s rule: CUDA when available; fp16 on CUDA, bf16 or fp32 on CPU. The
    weights stay float32, so fingerprints and identity dictionaries do not depend on the
    precision.
    """
    source = find_weights(path)
    state, config = read_state_dict(source.path)
    net = build_model(state, config, source=printable(source.path))
    device = pick_device(device)
    if device.type == "cpu":
        tune_cpu_allocator()
    return LoadedModel(net.to(device).eval(), pick_precision(precision, device), source)


def save_checkpoint(model: DMDNet, path: str | Path, half: bool = False) -> Path:
    """Write ``model`` as ``.safetensors`` with its configuration, atomically."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "config": json.dumps(model.config)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def convert(src: str | Path, dst: str | Path, half: bool = False) -> Path:
    """Any supported checkpoint -> our ``.safetensors`` (checked by a strict load first)."""
    state, config = read_state_dict(src)
    return save_checkpoint(build_model(state, config, source=printable(src)), dst, half=half)
