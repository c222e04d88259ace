"""The cleaning summary: counts per stage and reason, the exactly-once check, and report.md."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

EXAMPLES_PER_REASON = 3


def _snippet(record: Any, width: int = 90) -> str:
    if isinstance(record, dict):
        text = record.get("caption") or record.get("question") or ""
        if not text and isinstance(record.get("conversations"), list) and record["conversations"]:
            text = str(record["conversations"][-1].get("value", ""))
    else:
        text = str(record)
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def summarise(kept: Path, rejected: Path, input_ids: list[str], stages: list[str]) -> dict[str, Any]:
    """Count outcomes and verify that every input id appears exactly once across both files."""
    seen: Counter[str] = Counter()
    kept_count = 0
    by_stage: Counter[str] = Counter()
    by_reason: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with kept.open(encoding="utf-8") as handle:
        for line in handle:
            seen[str(json.loads(line)["id"])] += 1
            kept_count += 1
    with rejected.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            seen[str(row["id"])] += 1
            key = (row["stage"], row["reason"])
            by_stage[row["stage"]] += 1
            by_reason[key] += 1
            if len(examples[key]) < EXAMPLES_PER_REASON:
                examples[key].append(
                    {"id": str(row["id"]), "detail": row.get("detail", ""), "text": _snippet(row["record"])}
                )
    repeated = [i for i, n in seen.items() if n > 1]
    missing = [i for i in input_ids if i not in seen]
    if repeated or missing or len(seen) != len(input_ids):
        raise RuntimeError(
            f"exactly-once check failed: {len(missing)} input records missing (e.g. {missing[:3]}), "
            f"{len(repeated)} written twice (e.g. {repeated[:3]})"
        )
    order = ["input", *stages]
    return {
        "input": len(input_ids),
        "kept": kept_count,
        "rejected": sum(by_stage.values()),
        "by_stage": {stage: by_stage.get(stage, 0) for stage in order},
        "by_reason": [
            {"stage": stage, "reason": reason, "count": count, "examples": examples[(stage, reason)]}
            for (stage, reason), count in sorted(
                by_reason.items(), key=lambda kv: (order.index(kv[0][0]), -kv[1], kv[0][1])
            )
        ],
    }


def write_report(path: Path, summary: dict[str, Any], input_path: Path) -> None:
    """Write a Markdown report: funnel per stage, then each reason with a few examples."""
    lines = [
        "# Cleaning report",
        "",
        f"Input: `{input_path.name}`, {summary['input']} records. Kept {summary['kept']}, rejected "
        f"{summary['rejected']}.",
        "",
        "| stage | rejected | remaining |",
        "|---|---:|---:|",
    ]
    remaining = summary["input"]
    for stage, count in summary["by_stage"].items():
        remaining -= count
        lines.append(f"| {stage} | {count} | {remaining} |")
    lines += ["", "## Reasons", ""]
    if not summary["by_reason"]:
        lines.append("No record was rejected.")
    for entry in summary["by_reason"]:
        lines += [
            f"### {entry['stage']}: {entry['reason']} ({entry['count']})",
            "",
            "| id | detail | text |",
            "|---|---|---|",
        ]
        for example in entry["examples"]:
            detail = " ".join(str(example["detail"]).split()).replace("|", "\\|")[:80]
            lines.append(f"| `{example['id']}` | {detail} | {example['text']} |")
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
