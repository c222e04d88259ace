"""Record files: JSONL/JSON reading with line-precise errors, JSONL writing, and one reader for all forms.

`iter_records` accepts a `.jsonl`, a `.json` list, a `.parquet` shard or a folder of shards, so every
command takes whichever the previous step produced. `AppendOnlyJsonl` is the one writer of files that grow
as work is done and must survive a crash (cleaning outputs, batch and evaluation predictions, run logs).
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


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Stream record dicts from JSONL, a JSON list, a Parquet shard or a folder of shards."""
    from pallava.data.shards import iter_shards, list_shards

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: not found")
    if path.is_dir() or path.suffix == ".parquet":
        yield from iter_shards(list_shards(path))
    elif path.suffix == ".json":
        for index, value in enumerate(read_json_list(path)):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: record {index}: expected an object, got {type(value).__name__}")
            yield value
    else:
        for _, value in iter_jsonl(path):
            yield value


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


def _complete_records(path: Path) -> tuple[list[dict[str, Any]], int, bool]:
    """(records, bytes to keep, whether a newline must be added) under the torn-line rule."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset, lines = 0, data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)  # no newline after it: the write may have been cut
        if line.strip():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if last:
                    return records, offset, False
                raise JsonlLineError(path, number, f"not valid JSON ({error})") from None
            if not isinstance(record, dict):
                if last:
                    return records, offset, False
                raise JsonlLineError(path, number, f"expected a JSON object, got {type(record).__name__}")
            records.append(record)
        offset += len(line) + (0 if last else 1)
    return records, offset, bool(lines[-1].strip())


def read_appended(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSONL file, read without changing it (see `AppendOnlyJsonl`)."""
    path = Path(path)
    return _complete_records(path)[0] if path.is_file() else []


class AppendOnlyJsonl:
    """A JSONL file written one record per line as work is done, and resumed after a crash.

    The one rule for a crash: a write is one line, so only the last line can be cut. A last line without
    its newline is kept (and given its newline) when it holds a whole JSON object, and cut off otherwise,
    so that record is written again. Any other line that is not a JSON object is an error naming the file
    and line (`JsonlLineError`), never skipped. `records` holds what the file held when opened, after
    `keep` (a filter, e.g. the steps up to a resumed checkpoint) dropped what it rejects.
    """

    def __init__(self, path: str | Path, keep: Callable[[dict[str, Any]], bool] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            self.records, size, add_newline = _complete_records(self.path)
            if keep is not None and not all(keep(record) for record in self.records):
                self.records = [record for record in self.records if keep(record)]
                write_jsonl(self.records, self.path)  # atomically: a crash here leaves the old file
            else:
                with self.path.open("r+b") as handle:
                    handle.truncate(size)
                    if add_newline:
                        handle.seek(size)
                        handle.write(b"\n")
        self._handle: TextIO = self.path.open("a", encoding="utf-8")

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
