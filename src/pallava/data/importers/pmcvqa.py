"""PMC-VQA CSV: `Figure_path, Caption, Question, Choice A..D, Answer[, Answer_label], split`.

Choices are published as "A:Focal uptake pattern"; the prefix is stripped. The answer letter comes from
`Answer_label` when present, else from `Answer` when it is a letter, else by matching `Answer` to a choice.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from pallava.data.records import VQAItem

LETTERS = ("A", "B", "C", "D")
CHOICE_COLUMNS = tuple(f"Choice {letter}" for letter in LETTERS)
_PREFIX = re.compile(r"^\s*([A-D])\s*[:.)]\s*")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _answer_letter(row: dict[str, str], options: list[str], where: str) -> str:
    label = (row.get("Answer_label") or "").strip().upper()
    if label:
        if label not in LETTERS[: len(options)]:
            raise ValueError(
                f"{where}: field 'Answer_label' must be one of {', '.join(LETTERS)}, got {label!r}"
            )
        return label
    answer = (row.get("Answer") or "").strip()
    if not answer:
        raise ValueError(f"{where}: field 'Answer' is empty")
    match = _PREFIX.match(answer)
    if answer.upper() in LETTERS:
        return answer.upper()
    if match and _norm(answer[match.end() :]) in {_norm(o) for o in options}:
        return match.group(1)
    for letter, option in zip(LETTERS, options, strict=False):
        if _norm(option) == _norm(answer):
            return letter
    raise ValueError(f"{where}: field 'Answer' {answer!r:.60} matches no choice")


def read_pmc_vqa(
    path: str | Path, image_root: str | Path | None = None, split: str | None = None
) -> Iterator[VQAItem]:
    """Multiple-choice items (answer = option letter); the figure caption goes to `meta['caption']`."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in ("Figure_path", "Question", *CHOICE_COLUMNS) if c not in columns]
        if "Answer" not in columns and "Answer_label" not in columns:
            missing.append("Answer")
        if missing:
            raise ValueError(f"{path}: PMC-VQA CSV is missing columns {missing}")
        if split is not None and "split" not in columns:
            raise ValueError(f"{path}: split '{split}' requested but the CSV has no 'split' column")
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}: row {row_number}"
            if None in row:
                raise ValueError(f"{where}: more fields than header columns")
            if split is not None and (row.get("split") or "").strip() != split:
                continue
            for column in ("Figure_path", "Question"):
                if not (row.get(column) or "").strip():
                    raise ValueError(f"{where}: field '{column}' is empty")
            options = []
            for letter, column in zip(LETTERS, CHOICE_COLUMNS, strict=True):
                text = (row.get(column) or "").strip()
                match = _PREFIX.match(text)
                if match and match.group(1) != letter:
                    raise ValueError(f"{where}: field '{column}' is labelled {match.group(1)!r}")
                text = text[match.end() :].strip() if match else text
                if not text:
                    raise ValueError(f"{where}: field '{column}' is empty")
                options.append(text)
            figure = row["Figure_path"].strip()
            image = str(Path(image_root) / figure) if image_root is not None else figure
            meta = {
                "source": "pmc-vqa",
                "caption": (row.get("Caption") or "").strip(),
                "split": (row.get("split") or "").strip() or None,
            }
            yield VQAItem(
                f"pmc-vqa:{path.stem}:{row_number}",
                image,
                row["Question"].strip(),
                _answer_letter(row, options, where),
                "choice",
                options,
                meta,
            )
