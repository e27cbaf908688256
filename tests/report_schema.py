"""The report's JSON schema, as docs/cli.md shows it: reports of real runs are checked against it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def schema() -> dict:
    """The first JSON block after the "Report schema" heading of docs/cli.md."""
    text = DOC.read_text().split("### Report schema", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", text, flags=re.S).group(1))


def checked(path: Path) -> dict:
    """The report at ``path``, after checking it against the documented schema."""
    report = json.loads(path.read_text())
    jsonschema.validate(report, schema(), format_checker=jsonschema.FormatChecker())
    return report
