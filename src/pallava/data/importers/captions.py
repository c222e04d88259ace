"""Caption corpora: the authors' caption JSON, Quilt-1M lookup CSV and PMC-OA JSONL.

Ids are `<source>:<file stem>:<record number>` so they are stable for a given file and unique across
files; exact duplicate rows keep distinct ids (the cleaner's duplicate stage removes them).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pallava.data.io import iter_jsonl, read_json_list
from pallava.data.records import CaptionPair


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field '{field}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _image(value: str, image_root: Path | None) -> str:
    return str(image_root / value) if image_root is not None else value


def read_caption_json(path: str | Path, image_root: str | Path | None = None) -> Iterator[CaptionPair]:
    """The authors' PCaption release: a JSON list of `{image, caption}` (extra keys kept in meta)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    for index, entry in enumerate(read_json_list(path)):
        where = f"{path}: record {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with 'image' and 'caption'")
        image = _text(entry.get("image"), where, "image")
        caption = _text(entry.get("caption"), where, "caption")
        meta = {k: v for k, v in entry.items() if k not in ("image", "caption", "id")}
        record_id = str(entry.get("id") or f"pcaption:{path.stem}:{index}")
        yield CaptionPair(_image(image, root), caption, record_id, "pcaption", meta)


def read_quilt_csv(path: str | Path, image_root: str | Path | None = None) -> Iterator[CaptionPair]:
    """Quilt-1M `quilt_1M_lookup.csv`: needs `image_path` and `caption`; other columns go to meta."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Quilt captions can be long narrations
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in ("image_path", "caption") if c not in columns]
        if missing:
            raise ValueError(f"{path}: Quilt-1M CSV needs columns image_path and caption; missing {missing}")
        for row_number, row in enumerate(reader, start=2):
            where = f"{path}: row {row_number}"
            if None in row:
                raise ValueError(f"{where}: more fields than header columns")
            image = _text(row.get("image_path"), where, "image_path")
            caption = _text(row.get("caption"), where, "caption")
            meta = {
                k: v
                for k, v in row.items()
                if k and k not in ("image_path", "caption") and not k.startswith("Unnamed")
            }
            yield CaptionPair(_image(image, root), caption, f"quilt:{path.stem}:{row_number}", "quilt", meta)


def read_pmc_oa_jsonl(path: str | Path, image_root: str | Path | None = None) -> Iterator[CaptionPair]:
    """PMC-OA `pmc_oa.jsonl`: one `{image, caption, pmcid, url_name}` per line."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    for line, entry in iter_jsonl(path):
        where = f"{path}: line {line}"
        image = _text(entry.get("image"), where, "image")
        caption = _text(entry.get("caption"), where, "caption")
        meta = {k: v for k, v in entry.items() if k not in ("image", "caption")}
        yield CaptionPair(_image(image, root), caption, f"pmc-oa:{path.stem}:{line}", "pmc-oa", meta)
