"""Atomic file writes: a crash or an error never leaves a half-written output behind.

The temporary file beside the target is named ``.NAME.dmdnet-TOKEN-XXXX.part.EXT``. ``TOKEN`` is
random per process (:data:`TOKEN`; a cluster's workers are given their driver's), and a run
writes its token into its journal, so that the next run into the same folder removes exactly the
temporary files a killed run left, and can never match a file of the user's (:func:`leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

TOKEN = secrets.token_hex(8)  # this process's mark on its temporary files
_TEMPORARY = re.compile(r"\..+\.dmdnet-([0-9a-f]{16})-\w+\.part(\.[^.]*)?", re.S)
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, token: str = TOKEN) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name[:120]  # a name near the 255-byte limit still leaves room for the mark
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.dmdnet-{token}-", suffix=".part" + path.suffix[:20], dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp's (and safetensors') 0600 would hide outputs from the user's other programs
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def leftovers(folder: str | Path, tokens: set[str]) -> list[Path]:
    """The temporary files that writes marked with ``tokens`` left in ``folder`` and below (a killed
    run's): regular files only, never a link or a folder, whatever their names."""
    found = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            marked = _TEMPORARY.fullmatch(name)
            path = Path(root) / name
            if marked and marked.group(1) in tokens and stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return found
