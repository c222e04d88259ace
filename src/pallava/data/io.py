"""Record files: one reader for every form records come in, and the JSON/JSONL helpers of `pallava.files`.

`iter_records` accepts a `.jsonl`, a `.json` list, a `.parquet` shard or a folder of shards, so every
command takes whichever the previous step produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pallava.files import (
    AppendOnlyJsonl,
    JsonlLineError,
    iter_appended,
    iter_jsonl,
    read_appended,
    read_json_list,
    read_json_object,
    write_jsonl,
)

__all__ = [
    "AppendOnlyJsonl",
    "JsonlLineError",
    "iter_appended",
    "iter_jsonl",
    "iter_records",
    "read_appended",
    "read_json_list",
    "read_json_object",
    "write_jsonl",
]


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
