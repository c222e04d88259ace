"""Predictions JSONL: one record per line, written as answers arrive, resumable after a crash.

A run killed mid-write leaves at most one torn last line; reading ignores it and the
writer cuts it off before appending, so a resumed run never duplicates or loses an item.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

PREDICTION_FIELDS = ("id", "question", "prediction", "reference", "answer_type")


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records and the byte length of the valid prefix (everything before a torn last line)."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        is_last = number == len(lines)
        end = offset + len(line) + (0 if is_last else 1)
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if is_last:  # no newline after it: the write was interrupted
                    return records, offset
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
        offset = end
    return records, offset


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a predictions file; each must have the prediction fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    records, _ = _parse_lines(path)
    for number, record in enumerate(records, start=1):
        missing = [name for name in PREDICTION_FIELDS if name not in record]
        if missing:
            raise ValueError(
                f"{path}: record {number} (id {record.get('id', '?')}): missing field(s) {missing}"
            )
    return records


class PredictionWriter:
    """Appends prediction records to a JSONL file, keeping what a previous run wrote.

    `done` holds the ids already present, so a runner can skip them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            self.records, valid_bytes = _parse_lines(self.path)
            with self.path.open("r+b") as handle:  # drop a torn tail before appending
                handle.truncate(valid_bytes)
                if valid_bytes and not self._ends_with_newline(handle, valid_bytes):
                    handle.seek(valid_bytes)
                    handle.write(b"\n")
        self.done = {str(record.get("id")) for record in self.records}
        self._handle: TextIO = self.path.open("a", encoding="utf-8")

    @staticmethod
    def _ends_with_newline(handle: Any, size: int) -> bool:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record and flush it, so a crash loses at most this line."""
        self._handle.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
        self._handle.flush()
        self.records.append(dict(record))
        self.done.add(str(record["id"]))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
