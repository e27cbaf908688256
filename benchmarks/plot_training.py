"""Training curves from BasicSR logs: losses and validation PSNR against iterations.

    python benchmarks/plot_training.py experiments/DMDNet_demo/train_*.log -o docs/training_curves.png

Give every log of a resumed run; later lines win where iterations repeat.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ITER = re.compile(r"iter:\s*([\d,]+), lr:.*?\]\s*\[eta.*?\]\s*(.*)$")
VALID = re.compile(r"Validation \S+ @ (\d+): (.*)$")
PAIR = re.compile(r"([a-z_]+):? (-?[\d.e+-]+)")


def parse(logs: list[Path]) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """(iteration -> losses, iteration -> validation metrics) over all the logs."""
    losses: dict[int, dict[str, float]] = {}
    metrics: dict[int, dict[str, float]] = {}
    for log in logs:
        for line in log.read_text().splitlines():
            if m := ITER.search(line):
                losses[int(m[1].replace(",", ""))] = {k: float(v) for k, v in PAIR.findall(m[2])}
            elif m := VALID.search(line):
                metrics[int(m[1])] = {k: float(v) for k, v in PAIR.findall(m[2].replace(",", ""))}
    return losses, metrics


def plot(logs: list[Path], out: Path) -> None:
    losses, metrics = parse(logs)
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(losses)
    for name in sorted({k for v in losses.values() for k in v}):
        ax_loss.plot(steps, [losses[s].get(name) for s in steps], label=name, linewidth=1)
    ax_loss.set(xlabel="iteration", ylabel="training loss (L1)", yscale="log", title="training loss")
    ax_loss.legend()
    steps = sorted(metrics)
    for name in sorted({k for v in metrics.values() for k in v if k.startswith("psnr_")}):
        ax_psnr.plot(steps, [metrics[s].get(name) for s in steps], marker="o", markersize=3,
                     label=name.removeprefix("psnr_"))
    ax_psnr.set(xlabel="iteration", ylabel="PSNR (dB)", title="held-out validation (00121, 00146)")
    ax_psnr.legend()
    for ax in (ax_loss, ax_psnr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/training_curves.png"))
    args = parser.parse_args()
    plot(args.logs, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
