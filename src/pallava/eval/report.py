"""Reports: `report.json` (every number), `report.md` (the same, readable) and the plots.

The headline scorer's blocks sit at the top level of the VQA report (`closed.accuracy`,
`open.recall`, ...); the other scorers follow under `scorers` so a reader sees how much the
choice of scorer alone moves the numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pallava.eval import plots
from pallava.eval.metrics import accuracy, bootstrap_ci, confusion_matrix, precision_recall_f1
from pallava.eval.normalize import first_yes_no, normalize_strict
from pallava.eval.runner import UNMAPPED
from pallava.eval.scorers import SCORERS, ItemScore, Tokenize, is_permuted_copy, item_scores, score

SIZE_BINS = ((256, "<=256 px"), (512, "257-512 px"), (1024, "513-1024 px"), (2048, "1025-2048 px"))


def _size_bin(size: Sequence[int] | None) -> str | None:
    if not size:
        return None
    longest = max(size)
    for limit, name in SIZE_BINS:
        if longest <= limit:
            return name
    return ">2048 px"


def grouped_accuracy(
    scores: Sequence[ItemScore], groups: Sequence[Any], n_resamples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Accuracy with a 95% interval per group value (items with group None or dropped are left out)."""
    buckets: dict[Any, list[float]] = {}
    for item, group in zip(scores, groups, strict=True):
        if group is not None and item.correct is not None:
            buckets.setdefault(group, []).append(float(item.correct))
    order = [name for _, name in SIZE_BINS] + [">2048 px"]
    keys = sorted(buckets, key=lambda g: order.index(g) if g in order else g)
    rows = []
    for key in keys:
        bounds = bootstrap_ci(buckets[key], n_resamples=n_resamples, seed=seed)
        rows.append(
            {
                "group": key,
                "n": len(buckets[key]),
                "accuracy": accuracy(buckets[key]),
                "accuracy_ci": list(bounds),
            }
        )
    return rows


def _closed_confusion(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Yes/no truth against the answer's first yes/no word ("neither" when it has none)."""
    pairs = [
        (
            first_yes_no(normalize_strict(str(r["reference"]))),
            first_yes_no(normalize_strict(str(r.get("prediction") or ""))),
        )
        for r in records
        if r.get("answer_type") == "closed"
    ]
    pairs = [(truth, guess or "neither") for truth, guess in pairs if truth]
    if not pairs:
        return None
    columns = ["yes", "no", "neither"]
    matrix = confusion_matrix([t for t, _ in pairs], [g for _, g in pairs], columns)[:2]
    return {"rows": columns[:2], "columns": columns, "matrix": matrix.tolist()}


def vqa_report(
    records: Sequence[Mapping[str, Any]],
    scorer: str = "strict",
    n_resamples: int = 1000,
    seed: int = 0,
    tokenize: Tokenize | None = None,
) -> dict[str, Any]:
    """The VQA report: headline scorer at the top level, the others under `scorers`, accuracy by
    tile count and by image size, and a yes/no confusion matrix for closed questions. `tokenize` (the
    model's tokenizer) gives the `paper` scorer the authors' open recall over language-model tokens."""
    report = {"task": "vqa", **score(records, scorer, n_resamples=n_resamples, seed=seed, tokenize=tokenize)}
    report["scorers"] = {
        name: score(records, name, n_resamples=n_resamples, seed=seed, tokenize=tokenize)
        for name in SCORERS
        if name != scorer
    }
    primary = [r for r in records if not is_permuted_copy(r)]
    scores = item_scores(primary, scorer, tokenize)
    report["by_tiles"] = grouped_accuracy(scores, [r.get("tiles") for r in primary], n_resamples, seed)
    report["by_image_size"] = grouped_accuracy(
        scores, [_size_bin(r.get("image_size")) for r in primary], n_resamples, seed
    )
    report["closed_confusion"] = _closed_confusion(primary)
    return report


def _macro_f1_statistic(n_labels: int) -> Callable[[np.ndarray], np.ndarray]:
    """Macro F1 of resampled (true, predicted) pairs coded as true * (n_labels + 1) + predicted."""
    width = n_labels + 1  # the last predicted column is "unmapped"

    def statistic(resamples: np.ndarray) -> np.ndarray:
        count, n = resamples.shape
        offsets = (np.arange(count)[:, None] * n_labels * width + resamples).astype(np.int64).ravel()
        cells = np.bincount(offsets, minlength=count * n_labels * width).reshape(count, n_labels, width)
        tp = np.stack([cells[:, k, k] for k in range(n_labels)], axis=1).astype(np.float64)
        predicted = cells[:, :, :n_labels].sum(axis=1)
        actual = cells.sum(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, 0.0)
            recall = np.where(actual > 0, tp / actual, 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
            seen = (actual > 0) | (predicted > 0)  # as precision_recall_f1: in the data or predicted
            return np.where(seen.any(axis=1), (f1 * seen).sum(axis=1) / seen.sum(axis=1), 0.0)

    return statistic


def zeroshot_report(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Classification report: accuracy, micro/macro F1 (with 95% intervals), per-class scores and a
    confusion matrix whose last column counts unmapped answers. Reusable by any zero-shot path."""
    labels = list(labels)
    columns = labels + [UNMAPPED]
    y_pred = [p if p in labels else UNMAPPED for p in y_pred]
    hits = [float(t == p) for t, p in zip(y_true, y_pred, strict=True)]
    scores = precision_recall_f1(y_true, y_pred, labels)
    codes = [labels.index(t) * len(columns) + columns.index(p) for t, p in zip(y_true, y_pred, strict=True)]
    macro_ci = bootstrap_ci(
        codes, n_resamples=n_resamples, seed=seed, statistic=_macro_f1_statistic(len(labels))
    )
    matrix = confusion_matrix(y_true, y_pred, columns)[: len(labels)]
    return {
        "task": "zeroshot",
        "n": len(y_true),
        "accuracy": accuracy(hits),
        "accuracy_ci": list(bootstrap_ci(hits, n_resamples=n_resamples, seed=seed) or []),
        "micro": scores["micro"],
        "macro": {**scores["macro"], "f1_ci": list(macro_ci or [])},
        "per_class": scores["per_class"],
        "n_unmapped": sum(p == UNMAPPED for p in y_pred),
        "confusion": {"rows": labels, "columns": columns, "matrix": matrix.tolist()},
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ci(bounds: Sequence[float] | None) -> str:
    return "" if not bounds else f" [{_pct(bounds[0])}, {_pct(bounds[1])}]"


def _vqa_markdown(report: Mapping[str, Any], images: Mapping[str, str]) -> list[str]:
    lines = ["| scorer | type | n | accuracy % [95% CI] | open recall % [95% CI] |", "|---|---|---|---|---|"]
    everything = {report["scorer"]: report, **report["scorers"]}
    for name, summary in everything.items():
        for kind in ("closed", "open", "choice", "overall"):
            block = summary.get(kind)
            if not block:
                continue
            n = f"{block['n_scored']} of {block['n']} (legacy)" if "n_dropped" in block else str(block["n"])
            recall = (
                f"{_pct(block['recall'])}{_ci(block.get('recall_ci'))} ({block.get('recall_unit', '?')})"
                if "recall" in block
                else ""
            )
            lines.append(
                f"| {name} | {kind} | {n} | {_pct(block['accuracy'])}{_ci(block.get('accuracy_ci'))} "
                f"| {recall} |"
            )
    if "llava-med" in everything:
        lines += [
            "",
            f"`llava-med` closed numbers: {everything['llava-med'].get('closed', {}).get('flaw', 'n/a')}",
        ]
    if report.get("choice_orders"):
        orders = report["choice_orders"]
        lines += [
            "",
            "## Option order",
            "",
            f"{orders['n_questions']} choice questions, {orders['n_orders_total']} (question, order) pairs: "
            f"accuracy over all orders {_pct(orders['accuracy_all_orders'])}%, same option in every order "
            f"{_pct(orders['consistency'])}%, right in every order {_pct(orders['all_orders_correct'])}%.",
        ]
    for key, title in (("by_tiles", "tile count"), ("by_image_size", "image size (longest side)")):
        if report.get(key):
            lines += [
                "",
                f"## Accuracy by {title} ({report['scorer']})",
                "",
                "| group | n | accuracy % [95% CI] |",
                "|---|---|---|",
            ]
            lines += [
                f"| {row['group']} | {row['n']} | {_pct(row['accuracy'])}{_ci(row['accuracy_ci'])} |"
                for row in report[key]
            ]
    return lines + [f"\n![{name}]({file})" for name, file in images.items()]


def _zeroshot_markdown(report: Mapping[str, Any], images: Mapping[str, str]) -> list[str]:
    lines = [
        f"Accuracy {_pct(report['accuracy'])}%{_ci(report['accuracy_ci'])}; micro F1 "
        f"{_pct(report['micro']['f1'])}%; "
        f"macro F1 {_pct(report['macro']['f1'])}%{_ci(report['macro']['f1_ci'])}; "
        f"unmapped answers {report['n_unmapped']} of {report['n']} (counted wrong).",
        "",
        "| class | support | precision % | recall % | F1 % |",
        "|---|---|---|---|---|",
    ]
    for label, row in report["per_class"].items():
        lines.append(
            f"| {label} | {row['support']} | {_pct(row['precision'])} | {_pct(row['recall'])} "
            f"| {_pct(row['f1'])} |"
        )
    confusion = report["confusion"]
    lines += [
        "",
        "## Confusion matrix (rows: truth, columns: answer)",
        "",
        "| | " + " | ".join(confusion["columns"]) + " |",
        "|---" * (len(confusion["columns"]) + 1) + "|",
    ]
    lines += [
        f"| {label} | " + " | ".join(str(v) for v in row) + " |"
        for label, row in zip(confusion["rows"], confusion["matrix"], strict=True)
    ]
    return lines + [f"\n![{name}]({file})" for name, file in images.items()]


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "Evaluation") -> dict[str, Path]:
    """Write the plots, `report.json` and `report.md` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    if report["task"] == "vqa":
        everything = {report["scorer"]: report, **report.get("scorers", {})}
        images["accuracy by answer type"] = plots.accuracy_by_type(
            everything, out / "accuracy_by_type.png"
        ).name
        for key, label in (("by_tiles", "tiles per image"), ("by_image_size", "longest image side")):
            if report.get(key):
                path = plots.accuracy_by_group(report[key], out / f"accuracy_{key}.png", label)
                images[f"accuracy {key.replace('_', ' ')}"] = path.name
        if report.get("closed_confusion"):
            confusion = report["closed_confusion"]
            images["closed yes/no confusion"] = plots.confusion(
                np.asarray(confusion["matrix"]),
                confusion["rows"],
                confusion["columns"],
                out / "closed_confusion.png",
            ).name
        body = _vqa_markdown(report, images)
    else:
        confusion = report["confusion"]
        images["confusion matrix"] = plots.confusion(
            np.asarray(confusion["matrix"]), confusion["rows"], confusion["columns"], out / "confusion.png"
        ).name
        body = _zeroshot_markdown(report, images)
    report["plots"] = sorted(images.values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    header = [f"# {title}", ""] + [
        f"- {key}: `{report[key]}`" for key in ("model", "data", "split") if report.get(key)
    ]
    (out / "report.md").write_text("\n".join(header + [""] + body) + "\n", encoding="utf-8")
    return {
        "json": out / "report.json",
        "markdown": out / "report.md",
        **{name: out / f for name, f in images.items()},
    }
