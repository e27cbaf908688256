"""Opening the files a user names: regular files only, judged on the opened file before a byte is read.

``open()`` on a FIFO waits for a writer; inside a worker thread that wait outlives Ctrl-C and SIGTERM, so a
run given ``mkfifo x.jpg`` never ended. A device such as ``/dev/zero`` never ends either, and a sparse 30 GB
``photo.jpg`` would be in memory before its header is looked at. The check is made on the descriptor that
is then read, so a file swapped for a FIFO between a check and the open cannot slip through.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotARegularFile(OSError):
    """A FIFO, a socket or a device where a file was expected."""


class FileTooLarge(OSError):
    """Larger than any file of its kind; checked from its size before reading."""


def open_regular(path: str | Path) -> BinaryIO:
    """The file, opened for reading, if it is a regular one; a folder raises :class:`IsADirectoryError`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO opens without a writer
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a file that grows while read is caught too)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        shown = max(size, len(data))
        raise FileTooLarge(
            errno.EFBIG, f"{shown / 2**20:.0f} MiB, more than the limit of {max_bytes / 2**20:.0f} MiB", str(path)
        )
    return data
