"""Opening the files a user names: regular files only, judged before a byte is read.

``open()`` on a FIFO waits for a writer; inside a worker thread that wait outlives Ctrl-C and SIGTERM, so a
run given ``mkfifo x.jpg`` never ended. A device such as ``/dev/zero`` never ends either, and a sparse 30 GB
``photo.jpg`` would be in memory before its header is looked at. The name is judged by ``stat`` first (so a
FIFO is never opened: opening it would break the pipe of a writer waiting for its real reader), then the
opened descriptor again, so a file swapped for a FIFO in between cannot slip through. Readers that only
take a name (FFmpeg, safetensors, torch) get :func:`checked_name`: the descriptor's own name where the
system has one (``/proc/self/fd``), so they too read the file that was checked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX: a FIFO swapped in after the stat opens without a writer
_FD_NAMES = Path("/proc/self/fd")


class NotARegularFile(OSError):
    """A FIFO, a socket or a device where a file was expected."""


class FileTooLarge(OSError):
    """Larger than any file of its kind; checked from its size before reading."""


class BrokenLink(OSError):
    """A link that leads nowhere: a loop, or into a folder that does not exist."""


def _judge(mode: int, path: str | Path) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    if not stat.S_ISREG(mode):
        raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))


def open_regular(path: str | Path, max_bytes: int | None = None) -> BinaryIO:
    """The file, opened for reading, if it is a regular one of at most ``max_bytes`` (when given); a folder
    raises :class:`IsADirectoryError`."""
    _judge(os.stat(path).st_mode, path)
    fd = os.open(path, _FLAGS | _NONBLOCK)
    try:
        info = os.fstat(fd)
        _judge(info.st_mode, path)
        if max_bytes is not None and info.st_size > max_bytes:
            raise FileTooLarge(errno.EFBIG, _too_large(info.st_size, max_bytes), str(path))
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a file that grows while read is caught too)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(errno.EFBIG, _too_large(len(data), max_bytes), str(path))
    return data


def _too_large(size: int, max_bytes: int) -> str:
    return f"{size / 2**20:.0f} MiB, more than the limit of {max_bytes / 2**20:.0f} MiB"


def unreadable(exc: OSError) -> str:
    """What stopped a read, in a few words (the caller names the file)."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, (IsADirectoryError, NotARegularFile, FileTooLarge, BrokenLink)):
        return exc.strerror
    return f"cannot read it ({exc.strerror or type(exc).__name__})"


def write_target(path: str | Path) -> str:
    """Where a write to ``path`` goes: the file a link leads to (an atomic write replaces what it is given,
    and replacing the link would leave the file it names stale), or the path itself."""
    if not os.path.islink(path):
        return str(path)
    target = os.path.realpath(path)
    if os.path.islink(target) or not os.path.isdir(os.path.dirname(target)):
        raise BrokenLink(errno.ELOOP, "a link that leads nowhere (a loop, or a folder that does not exist)", str(path))
    return target


@contextlib.contextmanager
def checked_name(path: str | Path, max_bytes: int | None = None) -> Iterator[str]:
    """A name under which a reader that opens files itself finds the regular file checked here, valid
    inside the block; ``max_bytes`` bounds its size as in :func:`open_regular`."""
    with open_regular(path, max_bytes) as f:
        fd_name = _FD_NAMES / str(f.fileno())
        yield str(fd_name) if fd_name.exists() else str(path)
