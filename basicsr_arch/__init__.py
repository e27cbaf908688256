"""BasicSR plug-in for DMDNet: importing this package registers the arch, model and datasets."""

import sys
from collections.abc import Callable
from pathlib import Path

from . import compat, dmdnet_arch, dmdnet_dataset, dmdnet_model  # noqa: F401  (registration)
from .option_checks import OptionError

compat.apply()
ROOT = Path(__file__).resolve().parents[1]


def run(pipeline: Callable[[str], None]) -> None:
    """BasicSR's train or test pipeline with this checkout as its root (options/, experiments/,
    results/); a wrong option is one line naming it, not a traceback."""
    try:
        pipeline(str(ROOT))
    except OptionError as exc:
        sys.exit(f"error: {exc}")
