"""Test-accuracy curves of the reproduction commands: mean ± std over seeds, one line per
optimizer, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: One run's curve: ``(epoch, test accuracy %)`` points in increasing epoch order.
Curve = list[tuple[float, float]]


def accuracy_curve(summary: Mapping[str, Any]) -> Curve:
    """The ``(epoch, test_acc)`` points of a trainer summary: every evaluated epoch of its
    ``history``, or the final evaluation alone when the run stopped inside its first epoch
    (``run.max_steps``)."""
    points = [(float(rec["epoch"]), float(rec["test_acc"])) for rec in summary["history"]
              if rec.get("test_acc") is not None]
    final = summary.get("test_acc")
    if final is not None and (not points or summary["epochs"] > points[-1][0]):
        points.append((float(summary["epochs"]), float(final)))
    return points


def mean_std_curve(curves: Sequence[Curve]) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and std (0 for one value) over the curves that have each epoch."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for epoch, acc in curve:
            by_epoch.setdefault(epoch, []).append(acc)
    epochs = sorted(by_epoch)
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def plot_accuracy_curves(curves: Mapping[str, Sequence[Curve]], path: Path, title: str,
                         reference: Mapping[str, float] | None = None) -> Path:
    """Write a PNG of test accuracy against epoch, mean line and ±1 std band per optimizer.

    Args:
        curves: ``{label: [one curve per seed]}``; labels without curves are left out.
        path: PNG file to write (parent folders are created).
        title: figure title.
        reference: optional ``{label: accuracy}`` drawn as dotted horizontal lines in the
            label's colour (e.g. the paper's numbers).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    lows: list[float] = []
    for i, (label, runs) in enumerate(curves.items()):
        if not runs or not any(runs):
            continue
        color = f"C{i % 10}"
        epochs, means, stds = mean_std_curve(runs)
        ax.plot(epochs, means, color=color, marker="o", markersize=3,
                label=f"{label} (n={len(runs)})")
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], color=color, alpha=0.2)
        if reference and label in reference:
            ax.axhline(reference[label], color=color, linestyle=":", linewidth=1)
        # Zoom on the converged part: early epochs of slow optimizers would squash the rest.
        lows.append(means[-1] - 3 * max(stds[-1], 1.0))
    if lows:
        ax.set_ylim(max(min(lows), 0.0), 100.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if reference:
        ax.text(0.01, 0.01, "dotted: paper (Table 2)", transform=ax.transAxes, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
