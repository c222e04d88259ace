"""Batch prediction over a JSONL file of questions, resumable.

Each input line is `{"id", "image", "question", ...}` (`image` a path relative to the input file's folder,
or to `image_root`; null for a text-only question). Each output line is the input record plus `answer`.
Answers are appended and flushed batch by batch; a re-run skips ids already in the output and drops a
torn last line left by an interrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pallava.data.io import iter_jsonl
from pallava.inference import PaLlava


@dataclass(frozen=True)
class PredictSummary:
    total: int  # records in the input
    skipped: int  # already answered in the output
    answered: int  # answered by this run


def read_requests(path: Path, image_root: Path | None = None) -> list[dict]:
    """Read and check every input record up front, so a bad record fails the run before any work."""
    root = image_root if image_root is not None else path.parent
    records, seen = [], set()
    for number, record in iter_jsonl(path):
        where = f"{path} line {number}"
        if not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
            raise ValueError(f"{where}: field 'id' must be a string or an integer")
        where += f" (id {record['id']!r})"
        if str(record["id"]) in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(str(record["id"]))
        if not isinstance(record.get("question"), str) or not record["question"].strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string")
        image = record.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise ValueError(f"{where}: field 'image' must be a path or null")
            if not (root / image).is_file():
                raise ValueError(f"{where}: image file not found: {root / image}")
        records.append(record)
    return records


def answered_ids(path: Path) -> set[str]:
    """Ids already answered in an output file. An unterminated last line is a torn write: it is kept if it
    parses (and gets its newline), cut off otherwise. A bad complete line is an error, never skipped."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # end of the last complete line
    ids = set()
    for number, line in enumerate(data[:cut].splitlines(), start=1):
        if line.strip():
            record_id = _record_id(line)
            if record_id is None:
                raise ValueError(f"{path} line {number}: not a prediction record; fix or remove the file")
            ids.add(record_id)
    tail = data[cut:]
    record_id = _record_id(tail) if tail.strip() else None
    with path.open("r+b") as handle:
        if record_id is not None:
            ids.add(record_id)
            handle.seek(0, 2)
            handle.write(b"\n")
        elif tail:
            handle.truncate(cut)
    return ids


def _record_id(line: bytes) -> str | None:
    try:
        record = json.loads(line)
        return str(record["id"]) if isinstance(record, dict) and "id" in record else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def predict_jsonl(
    assistant: PaLlava,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 8,
    image_root: str | Path | None = None,
    progress: bool = True,
    **options,
) -> PredictSummary:
    """Answer every record of `input_path` not yet in `output_path`, `batch_size` at a time."""
    input_path, output_path = Path(input_path), Path(output_path)
    root = Path(image_root) if image_root is not None else input_path.parent
    records = read_requests(input_path, root)
    done = answered_ids(output_path)
    todo = [r for r in records if str(r["id"]) not in done]
    output_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(records), initial=len(records) - len(todo), desc="predict", unit="q", disable=not progress
    )
    with output_path.open("a", encoding="utf-8") as out, bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [root / r["image"] if r.get("image") is not None else None for r in chunk]
            try:
                answers = assistant.ask_batch(images, [r["question"] for r in chunk], batch_size, **options)
            except ValueError as error:
                ids = ", ".join(repr(r["id"]) for r in chunk)
                raise ValueError(f"{input_path}: records {ids}: {error}") from error
            for record, answer in zip(chunk, answers, strict=True):
                out.write(json.dumps({**record, "answer": answer}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    return PredictSummary(total=len(records), skipped=len(records) - len(todo), answered=len(todo))
