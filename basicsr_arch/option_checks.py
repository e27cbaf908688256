"""Checks for user-written option files, run when the dataset and the model are built.

A BasicSR option file is hand-written YAML. Without these checks a typo is silently ignored, and
a string where a list belongs fails far away (``dataroots: /data/faces`` used to end in a
FileNotFoundError for the one-letter path ``'d'``). Each error names the option, what it got
and what it expects, and an unknown key comes with the closest known one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class OptionError(ValueError):
    """An option with the wrong type, range or name; the message says which and what is expected."""


@dataclass(frozen=True)
class Rule:
    """What one option accepts: a description for the message and a predicate."""

    expects: str
    accepts: Callable[[Any], bool]


def number(lo: float = float("-inf"), hi: float = float("inf"), integer: bool = False) -> Rule:
    kind = "an integer" if integer else "a number"
    bounds = "" if (lo, hi) == (float("-inf"), float("inf")) else f" in [{lo}, {hi}]"
    types = (int,) if integer else (int, float)
    return Rule(f"{kind}{bounds}", lambda v: isinstance(v, types) and not isinstance(v, bool) and lo <= v <= hi)


def value_range(lo: float, hi: float) -> Rule:
    """A [low, high] pair, as BasicSR's degradation ranges are written."""
    return Rule(
        f"a [low, high] pair with {lo} <= low <= high <= {hi}",
        lambda v: isinstance(v, list) and len(v) == 2 and all(number(lo, hi).accepts(x) for x in v) and v[0] <= v[1],
    )


def one_of(*choices: Any) -> Rule:
    return Rule(f"one of {list(choices)}", lambda v: v in choices)


def list_of(rule: Rule) -> Rule:
    return Rule(f"a list of {rule.expects}", lambda v: isinstance(v, list) and all(rule.accepts(x) for x in v))


def mapping(keys: Rule, values: Rule) -> Rule:
    return Rule(
        f"a mapping of {keys.expects} to {values.expects}",
        lambda v: isinstance(v, dict) and all(keys.accepts(k) and values.accepts(x) for k, x in v.items()),
    )


def existing_folder() -> Rule:
    return Rule("an existing folder", lambda v: isinstance(v, str) and Path(v).expanduser().is_dir())


def existing_file() -> Rule:
    return Rule("an existing file", lambda v: isinstance(v, str) and Path(v).expanduser().is_file())


TEXT = Rule("a string", lambda v: isinstance(v, str))
FLAG = Rule("true or false", lambda v: isinstance(v, bool))
SECTION = Rule("a mapping of options", lambda v: isinstance(v, dict))


def check_options(where: str, opt: dict, rules: dict[str, Rule], optional_none: bool = True) -> None:
    """Raise :class:`OptionError` for the first unknown key or unacceptable value in ``opt``.

    ``where`` is the option's path in the file (``datasets.train``). A value of ``~`` (None)
    means "not set" and is accepted for every key when ``optional_none``.
    """
    if not isinstance(opt, dict):
        raise OptionError(f"{where}: got {opt!r}, expected a mapping of options")
    for key, value in opt.items():
        if key not in rules:
            close = difflib.get_close_matches(str(key), list(rules), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(sorted(rules))}"
            raise OptionError(f"{where}.{key}: unknown option{hint}")
        if value is None and optional_none:
            continue
        if not rules[key].accepts(value):
            raise OptionError(f"{where}.{key}: got {value!r} ({type(value).__name__}), expected {rules[key].expects}")
