"""Batch prediction over a JSONL file of questions, resumable.

Each input line is `{"id", "image", "question", ...}` (`image` a path relative to the input file's folder,
or to `image_root`; null for a text-only question). Each output line is the input record plus `answer`.
Answers are appended and flushed as they come (`AppendOnlyJsonl`); a re-run skips ids already in the
output, and a last line cut by an interrupted run is answered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pallava.data.io import AppendOnlyJsonl, JsonlLineError, iter_jsonl, read_appended
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


def _output_file(opener, path: Path):
    """`opener(path)` with a bad output line reported as not being a prediction record."""
    try:
        return opener(path)
    except JsonlLineError as error:
        raise ValueError(
            f"{error.path} line {error.line}: not a prediction record; fix or remove the file"
        ) from None


def answered_ids(path: Path) -> set[str]:
    """Ids already answered in an output file, read without changing it (a torn last line is not counted)."""
    records = _output_file(read_appended, path)
    for number, record in enumerate(records, start=1):
        if "id" not in record:
            raise ValueError(
                f"{path} record {number}: not a prediction record (no 'id'); fix or remove the file"
            )
    return {str(record["id"]) for record in records}


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
    out = _output_file(AppendOnlyJsonl, output_path)
    todo = [r for r in records if str(r["id"]) not in done]
    bar = tqdm(
        total=len(records), initial=len(records) - len(todo), desc="predict", unit="q", disable=not progress
    )
    with out, bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [root / r["image"] if r.get("image") is not None else None for r in chunk]
            try:
                answers = assistant.ask_batch(images, [r["question"] for r in chunk], batch_size, **options)
            except ValueError as error:
                ids = ", ".join(repr(r["id"]) for r in chunk)
                raise ValueError(f"{input_path}: records {ids}: {error}") from error
            for record, answer in zip(chunk, answers, strict=True):
                out.append({**record, "answer": answer})
            bar.update(len(chunk))
    return PredictSummary(total=len(records), skipped=len(records) - len(todo), answered=len(todo))
