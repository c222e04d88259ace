"""Predictions JSONL: one record per line, written as answers arrive, resumable after a crash.

The file is an `AppendOnlyJsonl` (`pallava.data.io`): a line cut by a crash is dropped (or kept when it
is a whole record), so a resumed run never duplicates or loses an item.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pallava.data.io import AppendOnlyJsonl, read_appended

PREDICTION_FIELDS = ("id", "question", "prediction", "reference", "answer_type")


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a predictions file; each must have the prediction fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    records = read_appended(path)
    for number, record in enumerate(records, start=1):
        missing = [name for name in PREDICTION_FIELDS if name not in record]
        if missing:
            raise ValueError(
                f"{path}: record {number} (id {record.get('id', '?')}): missing field(s) {missing}"
            )
    return records


class PredictionWriter(AppendOnlyJsonl):
    """Appends prediction records to a JSONL file, keeping what a previous run wrote.

    `records` grows with every write; `done` holds the ids written so far, so a runner can skip them.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.done = {str(record.get("id")) for record in self.records}

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record and flush it, so a crash loses at most this line."""
        self.append(record)
        self.records.append(dict(record))
        self.done.add(str(record["id"]))
