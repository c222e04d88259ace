"""The slide evaluation report: report.json, report.md (metrics with 95% intervals) and scaling.png."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {
    "tumour_present": "tumour present",
    "tumour_type": "tumour type",
    "organ": "organ",
    "location": "location (quadrant)",
    "pointing_game": "pointing game",
    "tile_auroc": "tile AUROC",
}
METHODS = {
    "slide_model": "slide model",
    "attention_mil": "attention-MIL (PLIP)",
    "retrieve_then_ask": "retrieve-then-ask",
}


def _cell(block: dict) -> str:
    if block["value"] is None:
        return "-"
    ci = block["ci95"]
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{block['value']:.3f}{interval} (n={block['n']})"


def scaling_plot(scaling: list[dict], path: Path) -> Path:
    """Seconds and peak memory per slide against its tissue tiles."""
    tiles = [row["tissue_tiles"] for row in scaling]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(tiles, [row["seconds"] for row in scaling], s=14)
    left.set(xlabel="tissue tiles", ylabel="seconds per slide (cached features)", title="answering time")
    right.scatter(tiles, [row["peak_rss_mib"] / 1024 for row in scaling], s=14, color="tab:red")
    right.set(xlabel="tissue tiles", ylabel="peak resident memory (GiB)", title="peak memory")
    right.set_ylim(bottom=0)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_slide_report(report: dict, out: Path) -> dict[str, Path]:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = scaling_plot(report["scaling"], out / "scaling.png")
    methods = report["methods"]
    lines = [
        f"# Slide evaluation: {Path(report['slides']).name}",
        "",
        f"Model `{report['model']}`; {report['n_slides']} slides ({report['tumour_slides']} with tumour). "
        "Values with 95% bootstrap intervals over slides; n = slides where the metric is defined.",
        "",
        "| metric | " + " | ".join(METHODS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric, name in NAMES.items():
        lines.append(f"| {name} | " + " | ".join(_cell(methods[m][metric]) for m in methods) + " |")
    scaling = report["scaling"]
    largest = max(scaling, key=lambda row: row["tissue_tiles"])
    lines += [
        "",
        f"Largest slide: {largest['tissue_tiles']} tissue tiles answered in {largest['seconds']:.1f} s "
        f"(4 questions, cached features) with a peak of {largest['peak_rss_mib']:.0f} MiB resident; "
        f"computing its features took {largest['feature_seconds']:.1f} s.",
        "",
        "![seconds and peak memory against tissue tiles](scaling.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return {"json": out / "report.json", "markdown": out / "report.md", "plot": plot}
