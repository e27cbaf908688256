"""Text shown to people: a file name can hold any character but a slash, a message must stay one line.

A file called ``bad\\nerror: fake.jpg`` would otherwise print a second ``error:`` line of its own,
and an escape sequence in a name could rewrite the terminal. Every message that names a file
goes through :func:`printable`.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and the marks that turn
# text around (``nope\u202egpj.exe`` shows as "nopeexe.jpg")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(text: object) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``), so it prints as one line."""
    return _CONTROL.sub(_escape, str(text))
