"""Training curves from BasicSR logs: losses and validation PSNR against iterations.

    python benchmarks/plot_training.py stage1.log stage2.log@4500 -o docs/training_curves.png

Give every log of a resumed run; later lines win where iterations repeat. ``LOG@N`` shifts a
log's iterations by N, for a stage that started from another stage's weights (a dashed line
marks where it starts).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ITER = re.compile(r"iter:\s*([\d,]+), lr:.*?\]\s*\[eta.*?\]\s*(.*)$")
VALID = re.compile(r"Validation \S+ @ (\d+): (.*)$")
PAIR = re.compile(r"([a-z_]+):? (-?[\d.e+-]+)")
SMOOTH = 10  # logged points in the moving average of the loss (each point is one iteration's loss)


def _named(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Metric names as logged now: logs older than the one-word rename call the identity branch 'specific'."""
    return {k.replace("_specific", "_identity"): float(v) for k, v in pairs}


def parse(logs: list[tuple[Path, int]]) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """(iteration -> losses, iteration -> validation metrics) over all the (log, offset) pairs."""
    losses: dict[int, dict[str, float]] = {}
    metrics: dict[int, dict[str, float]] = {}
    for log, offset in logs:
        for line in log.read_text().splitlines():
            if m := ITER.search(line):
                losses[offset + int(m[1].replace(",", ""))] = _named(PAIR.findall(m[2]))
            elif m := VALID.search(line):
                metrics[offset + int(m[1])] = _named(PAIR.findall(m[2].replace(",", "")))
    return losses, metrics


def log_with_offset(arg: str) -> tuple[Path, int]:
    path, _, offset = arg.partition("@")
    return Path(path), int(offset or 0)


def plot(logs: list[tuple[Path, int]], out: Path) -> None:
    losses, metrics = parse(logs)
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(losses)
    for name in sorted({k for v in losses.values() for k in v}):
        x, y = np.array([(s, losses[s][name]) for s in steps if name in losses[s]]).T
        gap = np.diff(x) > 5 * np.median(np.diff(x))  # a stage that did not train this branch
        color, label = None, name
        for xs, ys in zip(np.split(x, np.flatnonzero(gap) + 1), np.split(y, np.flatnonzero(gap) + 1)):
            (line,) = ax_loss.plot(xs, ys, linewidth=0.6, alpha=0.35, color=color)
            color, width = line.get_color(), min(SMOOTH, len(ys))
            ax_loss.plot(
                xs[width - 1 :], np.convolve(ys, np.ones(width) / width, mode="valid"), color=color, label=label
            )
            label = None
    ax_loss.plot([], [], color="none", label=f"(lines: mean of {SMOOTH} logged steps)")
    ax_loss.set(xlabel="iteration", ylabel="training loss (the run's pixel loss)", yscale="log", title="training loss")
    ax_loss.legend()
    steps = sorted(metrics)
    for name in sorted({k for v in metrics.values() for k in v if k.startswith("psnr_")}):
        ax_psnr.plot(
            steps, [metrics[s].get(name) for s in steps], marker="o", markersize=3, label=name.removeprefix("psnr_")
        )
    inputs = [m["psnr_input"] for m in metrics.values() if "psnr_input" in m]
    if inputs:  # the first validations of an untrained net would flatten the interesting range
        ax_psnr.set_ylim(bottom=min(inputs) - 3)
    ax_psnr.set(xlabel="iteration", ylabel="PSNR (dB)", title="held-out validation (00121, 00146)")
    ax_psnr.legend()
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
        for _, offset in logs:
            if offset:
                ax.axvline(offset, color="gray", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=log_with_offset, help="LOG or LOG@ITERATION_OFFSET")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/training_curves.png"))
    args = parser.parse_args()
    plot(args.logs, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
