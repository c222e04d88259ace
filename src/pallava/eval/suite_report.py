"""The suite summary: one row per benchmark in `summary.json`, `summary.md` and a bar chart `summary.png`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pallava.eval import plots
from pallava.eval.report import _ci, _pct

VQA_KINDS = ("closed", "open", "choice")
# Summary columns: (title, row key, value key, interval key), each a share in [0, 1].
COLUMNS = (
    ("PLIP zero-shot acc.", "plip_zeroshot", "accuracy", "accuracy_ci"),
    ("PLIP ITM zero-shot acc.", "plip_matching", "accuracy", "accuracy_ci"),
    ("closed acc.", "closed", "accuracy", "accuracy_ci"),
    ("open acc.", "open", "accuracy", "accuracy_ci"),
    ("MC acc.", "choice", "accuracy", "accuracy_ci"),
    ("class macro F1", "classification", "macro_f1", "macro_f1_ci"),
)


def class_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary cell of a zero-shot classification report (PLIP's or the assistant's)."""
    return {
        "n": report["n"],
        "accuracy": report["accuracy"],
        "accuracy_ci": report["accuracy_ci"],
        "micro_f1": report["micro"]["f1"],
        "macro_f1": report["macro"]["f1"],
        "macro_f1_ci": report["macro"]["f1_ci"],
        "n_unmapped": report["n_unmapped"],
    }


def vqa_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary cells of a VQA report: n, accuracy (and open recall) with intervals per answer type."""
    keep = ("n", "accuracy", "accuracy_ci", "recall", "recall_ci")
    cells: dict[str, Any] = {"n_questions": report["overall"]["n"]}
    for kind in VQA_KINDS:
        if kind in report:
            cells[kind] = {key: value for key, value in report[kind].items() if key in keep}
    return cells


def cell(
    row: Mapping[str, Any], key: str, value: str, interval: str
) -> tuple[float | None, list[float] | None]:
    """(value, interval) of one summary column, (None, None) when the benchmark does not measure it."""
    block = row.get(key)
    if not block:
        return None, None
    return block[value], block.get(interval) or None


def _markdown(summary: Mapping[str, Any], plot: str) -> str:
    lines = ["# Evaluation suite", ""]
    lines += [
        f"- {key}: `{summary[key]}`" for key in ("suite", "model", "plip", "scorer") if summary.get(key)
    ]
    lines += [
        "",
        "Each value is a percentage with its 95% bootstrap interval; `-` means the benchmark does not "
        "measure it (no PLIP model given, a VQA file has no classes, a zero-shot task asks no VQA). n counts "
        "images (manifest and zero-shot benchmarks) or questions (VQA files).",
        "",
    ]
    lines.append("| dataset | kind | n | " + " | ".join(f"{title} %" for title, *_ in COLUMNS) + " |")
    lines.append("|---" * (3 + len(COLUMNS)) + "|")
    for row in summary["benchmarks"]:
        cells = []
        for _, key, value, interval in COLUMNS:
            number, bounds = cell(row, key, value, interval)
            cells.append("-" if number is None else f"{_pct(number)}{_ci(bounds)}")
        lines.append(f"| {row['name']} | {row['kind']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Reports", ""]
    for row in summary["benchmarks"]:
        links = ", ".join(f"[{part}]({path})" for part, path in row["reports"].items())
        lines.append(
            f"- {row['name']} ({row['data']}"
            + (f", split {row['split']}" if row.get("split") else "")
            + f"): {links}"
        )
    lines += ["", f"![accuracy per dataset]({plot})"]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write `summary.png`, `summary.json` and `summary.md` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["benchmarks"]
    series = {
        title: [cell(row, key, value, interval) for row in rows] for title, key, value, interval in COLUMNS
    }
    plot = plots.grouped_bars(
        [f"{row['name']}\nn={row['n']}" for row in rows],
        series,
        out / "summary.png",
        ylabel="accuracy / macro F1",
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(_markdown(summary, plot.name), encoding="utf-8")
    return {"json": out / "summary.json", "markdown": out / "summary.md", "plot": plot}
