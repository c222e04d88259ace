"""Report figures as PNG files, drawn with matplotlib's Agg canvas (no display, no global backend switch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _error_bars(values: Sequence[float], intervals: Sequence[Sequence[float] | None]) -> np.ndarray:
    """(2, n) distances below/above each value; zero where no interval exists."""
    low = [v - ci[0] if ci else 0.0 for v, ci in zip(values, intervals, strict=True)]
    high = [ci[1] - v if ci else 0.0 for v, ci in zip(values, intervals, strict=True)]
    return np.clip(np.array([low, high]), 0.0, None)


def confusion(matrix: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: str | Path) -> Path:
    """A count heat map, rows = truth, columns = answer, each cell labelled with its count."""
    matrix = np.asarray(matrix)
    figure = Figure(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.8 * len(rows)))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(len(columns)), labels=list(columns), rotation=35, ha="right")
    axes.set_yticks(range(len(rows)), labels=list(rows))
    axes.set_xlabel("answer")
    axes.set_ylabel("truth")
    threshold = matrix.max() / 2 if matrix.size and matrix.max() > 0 else 0.5
    for (r, c), value in np.ndenumerate(matrix):
        axes.text(c, r, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    return _save(figure, path)


def accuracy_by_type(summaries: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Grouped bars: accuracy per answer type for each scorer, with 95% interval error bars."""
    kinds = [k for k in ("closed", "open", "choice", "overall") if any(k in s for s in summaries.values())]
    figure = Figure(figsize=(2 + 1.6 * len(kinds), 3.6))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(summaries))
    for offset, (name, summary) in enumerate(summaries.items()):
        values = [summary[k]["accuracy"] if k in summary else 0.0 for k in kinds]
        intervals = [summary[k].get("accuracy_ci") if k in summary else None for k in kinds]
        positions = np.arange(len(kinds)) + (offset - (len(summaries) - 1) / 2) * width
        axes.bar(
            positions,
            values,
            width,
            yerr=_error_bars(values, intervals),
            capsize=3,
            label=f"{name} (legacy)" if summary.get("legacy") else name,
        )
    axes.set_xticks(range(len(kinds)), labels=kinds)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy")
    axes.legend(fontsize="small")
    return _save(figure, path)


def accuracy_by_group(rows: Sequence[Mapping[str, Any]], path: str | Path, xlabel: str) -> Path:
    """Accuracy per group (tile count, image size bin) with 95% interval error bars and counts."""
    figure = Figure(figsize=(max(3.5, 1.1 * len(rows) + 1.5), 3.4))
    axes = figure.add_subplot()
    values = [row["accuracy"] for row in rows]
    positions = np.arange(len(rows))
    axes.errorbar(
        positions, values, yerr=_error_bars(values, [row["accuracy_ci"] for row in rows]), fmt="o-", capsize=4
    )
    for x, row in zip(positions, rows, strict=True):
        axes.annotate(
            f"n={row['n']}",
            (x, row["accuracy"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize="small",
        )
    axes.set_xticks(positions, labels=[str(row["group"]) for row in rows])
    axes.set_xlabel(xlabel)
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("accuracy")
    return _save(figure, path)


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[tuple[float | None, Sequence[float] | None]]],
    path: str | Path,
    ylabel: str = "accuracy",
) -> Path:
    """One cluster of bars per group (e.g. dataset), one bar per series (value, 95% interval) with
    whiskers; a missing value (None) leaves a gap and is written as "n/a" over the axis."""
    figure = Figure(figsize=(max(4.5, 1.0 + 0.55 * len(series) * len(groups)), 3.8))
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(series))
    for offset, (name, cells) in enumerate(series.items()):
        positions = np.arange(len(groups)) + (offset - (len(series) - 1) / 2) * width
        values = [value if value is not None else 0.0 for value, _ in cells]
        intervals = [ci if value is not None else None for value, ci in cells]
        bars = axes.bar(positions, values, width, yerr=_error_bars(values, intervals), capsize=3, label=name)
        for x, (value, _) in zip(positions, cells, strict=True):
            if value is None:
                axes.text(
                    x,
                    0.02,
                    "n/a",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize="x-small",
                    color=bars.patches[0].get_facecolor(),
                )
    axes.set_xticks(range(len(groups)), labels=list(groups))
    axes.set_ylim(0, 1.05)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)
