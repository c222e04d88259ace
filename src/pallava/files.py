"""JSON and JSONL files: reading with errors naming the file and line, atomic JSONL writing, and
`AppendOnlyJsonl`, the one writer of files that grow as work is done and must survive a crash (cleaning
outputs, batch and evaluation predictions, run logs).

This module imports nothing else from pallava, so every layer may use it (`pallava.data.io` re-exports it
beside `iter_records`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises naming file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}: line {number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def read_json_list(path: str | Path) -> list[Any]:
    """Read a JSON file whose top level must be a list."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected a JSON list at the top level, got {type(value).__name__}")
    return value


def read_json_object(path: str | Path) -> dict[str, Any]:
    """Read a JSON file whose top level must be an object (a config or settings file)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON (not UTF-8: {error.reason} at byte {error.start})"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(value).__name__}")
    return value


def write_jsonl(records: Iterable[Any], path: str | Path) -> int:
    """Write records (dicts or objects with `to_dict`) as JSONL atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            data = record.to_dict() if hasattr(record, "to_dict") else record
            handle.write(json.dumps(data, ensure_ascii=False) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    return count


class JsonlLineError(ValueError):
    """A complete line of an append-only JSONL file that is not a JSON object."""

    def __init__(self, path: Path, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def _whole_record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _repair_tail(path: Path, block: int = 1 << 16) -> None:
    """Apply the torn-line rule to the last line, reading only the end of the file."""
    with path.open("r+b") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        cut = 0
        while end > 0:  # the start of the last line: just after the last newline
            start = max(0, end - block)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            end = start
        if cut == size:
            return
        handle.seek(cut)
        tail = handle.read()
        if not tail.strip():
            return
        if _whole_record(tail) is not None:
            handle.write(b"\n")  # the record was written whole; only its newline is missing
        else:
            handle.truncate(cut)


def iter_appended(path: str | Path, end: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the records of an append-only JSONL file (its first `end` bytes), without changing it.

    A last line without its newline counts only when it is a whole JSON object (see `AppendOnlyJsonl`);
    any other line that is not a JSON object raises `JsonlLineError`.
    """
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as handle:
        remaining = end
        for number, line in enumerate(handle, start=1):
            if remaining is not None:
                if remaining <= 0:
                    return
                line, remaining = line[:remaining], remaining - len(line)
            if not line.strip():
                continue
            record = _whole_record(line)
            if record is None:
                if not line.endswith(b"\n"):  # a cut last line
                    return
                try:
                    value = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                    raise JsonlLineError(path, number, f"not valid JSON ({error})") from None
                raise JsonlLineError(path, number, f"expected a JSON object, got {type(value).__name__}")
            yield record


def read_appended(path: str | Path) -> list[dict[str, Any]]:
    """All records of an append-only JSONL file, read without changing it (see `iter_appended`)."""
    return list(iter_appended(path))


class AppendOnlyJsonl:
    """A JSONL file written one record per line as work is done, and resumed after a crash.

    The one rule for a crash: a write is one line, so only the last line can be cut. A last line without
    its newline is kept (and given its newline) when it holds a whole JSON object, and cut off otherwise,
    so that record is written again. Any other line that is not a JSON object is an error naming the file
    and line (`JsonlLineError`), never skipped. Opening repairs only the tail (the file is not read);
    `records` reads what the file held when opened, on first use. `keep` (a filter, e.g. the steps up to a
    resumed checkpoint) drops the records it rejects first, rewriting the file atomically.
    """

    def __init__(self, path: str | Path, keep: Callable[[dict[str, Any]], bool] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[dict[str, Any]] | None = None
        if self.path.is_file():
            _repair_tail(self.path)
            if keep is not None:
                records = read_appended(self.path)
                self._records = [record for record in records if keep(record)]
                if len(self._records) != len(records):
                    write_jsonl(self._records, self.path)  # atomically: a crash here leaves the old file
        self._size_at_open = self.path.stat().st_size if self.path.is_file() else 0
        self._handle: TextIO = self.path.open("a", encoding="utf-8")

    @property
    def records(self) -> list[dict[str, Any]]:
        """The records the file held when opened (after `keep`); read on first use."""
        if self._records is None:
            self._records = list(iter_appended(self.path, end=self._size_at_open))
        return self._records

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one line and flush it, so a crash loses at most this line."""
        self._handle.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        """Flush and fsync: what was appended survives a power loss too."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> AppendOnlyJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two records of settings (missing on one side counts), sorted."""
    return sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
