"""Record files: JSONL/JSON reading with line-precise errors, JSONL writing, and one reader for all forms.

`iter_records` accepts a `.jsonl`, a `.json` list, a `.parquet` shard or a folder of shards, so every
command takes whichever the previous step produced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


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
        raise ValueError(f"{path}: not valid JSON (not UTF-8: {error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(value).__name__}")
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
