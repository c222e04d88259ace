"""The cleaning pipeline: every input record ends in exactly one of kept.jsonl / rejected.jsonl.

Stages (configurable order between the first and last): integrity (decodes, pixel limit) -> image judge ->
text judge -> caption length -> duplicates. Outputs are append-only JSONL written in input order and
flushed line by line (fsync per chunk), as `AppendOnlyJsonl` files: on restart a line cut by the kill is
dropped (or kept when whole), the set of finished ids and the duplicate index are rebuilt by streaming both
files (nothing else is held), and work resumes with the next record, so a killed and resumed run ends with
the same files as an uninterrupted one. A line that is not UTF-8, not JSON, or holds text UTF-8 cannot write
(a lone surrogate) is rejected at the input stage with its line number; it never stops the run.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pallava.data.clean.config import STAGES, CleanConfig
from pallava.data.clean.dedup import DuplicateIndex, image_hash, text_key
from pallava.data.clean.judges import build_judge
from pallava.data.clean.report import summarise, write_report
from pallava.data.clean.verdict import Verdict
from pallava.data.io import AppendOnlyJsonl, JsonlLineError, iter_appended
from pallava.data.records import IMAGE_TOKEN, CaptionPair, Conversation, VQAItem
from pallava.processing.loading import load_image

KEPT, REJECTED, STATE, REPORT = "kept.jsonl", "rejected.jsonl", "state.json", "report.md"


@dataclass
class _Entry:
    """One input record on its way through the stages."""

    line: int
    id: str
    data: dict[str, Any] | None
    raw: str
    kind: str = ""
    text: str = ""
    image: Path | None = None
    phash: str | None = None
    size: tuple[int, int] | None = None
    rejection: tuple[str, Verdict] | None = None
    stop: Verdict | None = None


# Another place to decode and judge: (input, pending entries, finished ids, config, progress, custom judges)
# -> the pending entries processed, in chunks, in input order.
Engine = Callable[
    [Path, Iterator[_Entry], set[str], CleanConfig, bool, "dict[str, Callable[[], Any]] | None"],
    Iterator[list[_Entry]],
]


class JudgeStopped(ValueError):
    """A judge failed with `on_judge_error: stop`; outputs hold everything before the failing record."""


def record_kind(data: dict[str, Any]) -> str:
    """caption, vqa or conversation, from the fields a record carries; ValueError naming the field if none
    fit."""
    if "caption" in data:
        CaptionPair.from_dict(data)
        return "caption"
    if "question" in data:
        VQAItem.from_dict(data)
        return "vqa"
    if "conversations" in data:
        Conversation.from_dict(data)
        return "conversation"
    raise ValueError("record has none of the fields 'caption', 'question' or 'conversations'")


def record_text(data: dict[str, Any], kind: str) -> str:
    """The text a text judge reads: the caption, the question and answer (+ figure caption), or all turns."""
    if kind == "caption":
        return data["caption"]
    if kind == "vqa":
        parts = [
            data["question"],
            *(data.get("options") or []),
            data["answer"],
            (data.get("meta") or {}).get("caption") or "",
        ]
        return "\n".join(p for p in parts if p)
    return "\n".join(turn["value"].replace(IMAGE_TOKEN, "").strip() for turn in data["conversations"])


# A JSON escape of a UTF-16 surrogate; only lines holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left is lone


def _lone_surrogate_field(value: Any, name: str = "") -> str | None:
    """The field (dotted path) of the first key or string holding a lone surrogate, which UTF-8 cannot
    write."""
    if isinstance(value, str):
        return (name or "<record>") if _LONE_SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        field_name = f"{name}.{key}" if name else str(key)
        if isinstance(key, str) and _LONE_SURROGATE.search(key):
            return field_name
        if (found := _lone_surrogate_field(item, field_name)) is not None:
            return found
    return None


def _record_id(data: Any) -> str | None:
    record_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) or str(record_id) == "":
        return None
    return str(record_id)


def _rejected_entry(
    line_number: int, record_id: str | None, data: Any, raw: str, reason: str, detail: str
) -> _Entry:
    entry = _Entry(
        line_number, record_id or f"line-{line_number}", data if isinstance(data, dict) else None, raw
    )
    entry.rejection = ("input", Verdict(False, reason, detail))
    return entry


def _parse_line(line_number: int, line: bytes) -> _Entry:
    """One input line as an entry; lines that cannot be read or written back become input-stage rejections."""
    try:
        raw = line.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = f"byte 0x{line[error.start]:02x} at column {error.start + 1} is not UTF-8"
        raw = line.decode("utf-8", "backslashreplace")  # shows the bad bytes as \xe9
        return _rejected_entry(line_number, None, None, raw, "invalid UTF-8", detail)
    try:
        data = json.loads(raw)
        field_name = _lone_surrogate_field(data) if _SURROGATE_ESCAPE.search(raw) else None
    except json.JSONDecodeError as error:
        return _rejected_entry(line_number, None, None, raw, "invalid JSON", error.msg)
    except RecursionError:
        return _rejected_entry(line_number, None, None, raw, "invalid JSON", "nested too deeply")
    record_id = _record_id(data)
    if field_name is not None:
        # the parsed record cannot be written as UTF-8: keep the raw line, and the id only if it is clean
        clean_id = record_id if record_id and not _LONE_SURROGATE.search(record_id) else None
        detail = f"field '{field_name}' holds a lone UTF-16 surrogate"
        return _rejected_entry(line_number, clean_id, None, raw, "invalid text", detail)
    if record_id is None:
        return _rejected_entry(line_number, None, data, raw, "malformed record", "missing field 'id'")
    return _Entry(line_number, record_id, data, raw)


def _scan_input(path: Path) -> Iterator[_Entry]:
    """Stream input lines as entries; unreadable lines become entries that the input stage rejects."""
    with path.open("rb") as handle:  # bytes: one undecodable line must not stop the others
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                yield _parse_line(line_number, line.rstrip(b"\r\n"))


def _input_ids(path: Path) -> list[str]:
    """All ids in input order; a repeated id is an input error (exactly-once needs unique ids)."""
    seen: dict[str, int] = {}
    for entry in _scan_input(path):
        if entry.id in seen:
            raise ValueError(
                f"{path}: line {entry.line}: id '{entry.id}' already used on line {seen[entry.id]}; "
                "ids must be unique"
            )
        seen[entry.id] = entry.line
    return list(seen)


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Stream the rows of an output file, one at a time (a line cut by a kill: `AppendOnlyJsonl`'s rule)."""
    try:
        for row in iter_appended(path):
            if "id" not in row:
                raise ValueError(f"{path}: a row without 'id'; remove the output folder to start over")
            yield row
    except JsonlLineError as error:
        raise ValueError(
            f"{error.path}: line {error.line} is corrupt; remove the output folder to start over"
        ) from None


def _check_state(out: Path, input_path: Path, config: CleanConfig) -> None:
    state = {"input": str(input_path.resolve()), "config": config.decision_fields()}
    path = out / STATE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != state:
            raise ValueError(
                f"{out}: holds a run with a different input or decision settings; use another output folder "
                f"(previous input: {previous.get('input')})"
            )
        return
    partial = out / (STATE + ".partial")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def _watch_parent(parent: int) -> None:
    """Pool initializer: exit when the parent dies (e.g. SIGKILL), so no worker outlives a killed run."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _integrity(job: tuple[str, int]) -> tuple[bool, str, str, str | None, tuple[int, int] | None]:
    """Decode one image: (ok, reason, detail, perceptual hash, size). Runs in a worker process."""
    path, max_pixels = job
    try:
        image = load_image(path, max_pixels)
        image.load()
        return True, "", "", image_hash(image), image.size
    except FileNotFoundError as error:
        return False, "missing file", str(error), None, None
    except ValueError as error:  # CorruptImageError, ImageTooLargeError
        reason = "too large" if "over the limit" in str(error) else "corrupt image"
        return False, reason, str(error), None, None
    except Exception as error:  # a decoder bug must reject the record, not crash the run
        return False, "corrupt image", f"{type(error).__name__}: {error}", None, None


class _Cleaner:
    def __init__(self, input_path: Path, config: CleanConfig) -> None:
        self.config = config
        self.image_root = Path(config.image_root) if config.image_root else input_path.parent
        stages = config.stages[1:-1]
        self.image_judge = (
            build_judge(config.image_judge, "image", config.max_pixels) if "image" in stages else None
        )
        self.text_judge = (
            build_judge(config.text_judge, "text", config.max_pixels) if "text" in stages else None
        )
        self.index = DuplicateIndex(config.duplicate_mode, config.max_hamming)
        self.pool = None
        if config.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = context.Pool(config.workers, initializer=_watch_parent, initargs=(os.getpid(),))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        for judge in (self.image_judge, self.text_judge):
            if hasattr(judge, "close"):
                judge.close()

    def _prepare(self, entry: _Entry) -> None:
        try:
            entry.kind = record_kind(entry.data or {})
        except ValueError as error:
            entry.rejection = ("input", Verdict(False, "malformed record", str(error)))
            return
        entry.text = record_text(entry.data, entry.kind)
        image = entry.data.get("image")
        if not image:
            entry.rejection = ("integrity", Verdict(False, "no image", "field 'image' is empty"))
            return
        path = Path(image)
        entry.image = path if path.is_absolute() else self.image_root / path

    def _run_stage(self, stage: str, alive: list[_Entry]) -> None:
        if stage == "image" and self.image_judge is not None:
            paths = [e.image for e in alive]
            if self.pool is not None and len(paths) > 1 and getattr(self.image_judge, "in_workers", False):
                verdicts = self.pool.map(self.image_judge.judge_image, paths)
            else:
                verdicts = self.image_judge.judge_images(paths)
        elif stage == "text" and self.text_judge is not None:
            verdicts = self.text_judge.judge_texts([e.text for e in alive])
        elif stage == "length":
            verdicts = [
                Verdict(False, "caption too short", f"{n} words < {self.config.min_words}")
                if e.kind == "caption" and (n := len(e.text.split())) < self.config.min_words
                else Verdict(True)
                for e in alive
            ]
        else:
            return
        for entry, verdict in zip(alive, verdicts, strict=True):
            if verdict.error and self.config.on_judge_error == "stop":
                entry.stop = verdict
            elif not verdict.ok:
                entry.rejection = (stage, verdict)

    def process(self, chunk: list[_Entry]) -> None:
        """Run every stage but `duplicate` on a chunk, setting each entry's rejection (or stop)."""
        self.decode(chunk)
        self.judge(chunk)

    def chunks(self, pending: Iterator[_Entry]) -> Iterator[list[_Entry]]:
        """The local engine: `pending` in chunks of `chunk_size`, processed here (and in the pool)."""
        while chunk := list(itertools.islice(pending, self.config.chunk_size)):
            self.process(chunk)
            yield chunk

    def decode(self, chunk: list[_Entry]) -> None:
        """The `input` and `integrity` stages: record type, image path, decoding, perceptual hash."""
        for entry in chunk:
            if entry.rejection is None:
                self._prepare(entry)
        alive = [e for e in chunk if e.rejection is None]
        jobs = [(str(e.image), self.config.max_pixels) for e in alive]
        results = (
            self.pool.map(_integrity, jobs)
            if self.pool is not None and len(jobs) > 1
            else map(_integrity, jobs)
        )
        for entry, (ok, reason, detail, phash, size) in zip(alive, results, strict=True):
            if ok:
                entry.phash, entry.size = phash, size
            else:
                entry.rejection = ("integrity", Verdict(False, reason, detail))

    def judge(self, chunk: list[_Entry]) -> None:
        """The middle stages (image, text, length), in the configured order, on the entries still alive."""
        for stage in self.config.stages[1:-1]:
            self._run_stage(stage, [e for e in chunk if e.rejection is None and e.stop is None])

    def kept_line(self, entry: _Entry) -> dict[str, Any]:
        data = dict(entry.data)
        data["image"] = str(entry.image)
        data["meta"] = {
            **(data.get("meta") or {}),
            "clean": {
                "phash": entry.phash,
                "text_key": text_key(entry.text),
                "width": entry.size[0],
                "height": entry.size[1],
            },
        }
        return data


def clean(
    input_path: str | Path,
    out_dir: str | Path,
    config: CleanConfig | None = None,
    progress: bool = True,
    judges: dict[str, Callable[[], Any]] | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Clean a JSONL of records into `out_dir` (kept.jsonl, rejected.jsonl, report.md); resumable.

    Returns the summary (counts per stage and reason). Raises `JudgeStopped` when a judge fails under
    `on_judge_error: stop` (re-run to resume) and ValueError for bad input or a foreign output folder.
    `judges` maps `image`/`text` to a function building a custom judge, used instead of the config's.
    `engine` decodes and judges elsewhere (`ray_engine.clean_on_ray` passes Ray's); this process still
    finds duplicates and writes every output line, so the files are the same as the local engine's.
    """
    config = config or CleanConfig()
    input_path, out = Path(input_path), Path(out_dir)
    if not input_path.is_file():
        raise ValueError(f"{input_path}: input file not found")
    input_ids = _input_ids(input_path)
    out.mkdir(parents=True, exist_ok=True)
    _check_state(out, input_path, config)
    # Earlier outputs are streamed: only their ids and the duplicate index stay in memory.
    done: set[str] = set()
    index = DuplicateIndex(config.duplicate_mode, config.max_hamming)
    for row in _read_rows(out / KEPT):
        done.add(str(row["id"]))
        index.add(str(row["id"]), row["meta"]["clean"]["phash"], row["meta"]["clean"]["text_key"])
    done.update(str(row["id"]) for row in _read_rows(out / REJECTED))
    unknown = done - set(input_ids)
    if unknown:
        raise ValueError(
            f"{out}: holds ids not in {input_path} (e.g. {sorted(unknown)[0]}); use another output folder"
        )
    # With another engine the judges live there; here only the duplicate index and the writing are needed.
    driver_config = replace(config, stages=[STAGES[0], STAGES[-1]], workers=1)
    cleaner = _Cleaner(input_path, config if engine is None else driver_config)
    cleaner.index = index
    started = time.perf_counter()
    bar = tqdm(
        total=len(input_ids),
        initial=len(done),
        unit="rec",
        desc="cleaning",
        disable=not progress,
        file=sys.stderr,
    )
    try:
        with AppendOnlyJsonl(out / KEPT) as kept, AppendOnlyJsonl(out / REJECTED) as rejected:
            pending = (entry for entry in _scan_input(input_path) if entry.id not in done)
            if engine is not None:
                chunks = engine(input_path, pending, done, config, progress, judges)
            else:
                for stage, build in (judges or {}).items():
                    setattr(cleaner, f"{stage}_judge", build())
                chunks = cleaner.chunks(pending)
            for chunk in chunks:
                for entry in chunk:
                    if entry.stop is not None:
                        kept.sync()
                        rejected.sync()
                        raise JudgeStopped(
                            f"{input_path}: line {entry.line}: record {entry.id}: judge failed "
                            f"({entry.stop.detail}); "
                            f"finished records are saved in {out}; fix the judge and re-run to resume"
                        )
                    if entry.rejection is None:
                        duplicate_of = cleaner.index.find(entry.phash, text_key(entry.text))
                        if duplicate_of is not None:
                            entry.rejection = ("duplicate", Verdict(False, "duplicate", f"of {duplicate_of}"))
                    if entry.rejection is None:
                        cleaner.index.add(entry.id, entry.phash, text_key(entry.text))
                        kept.append(cleaner.kept_line(entry))
                    else:
                        stage, verdict = entry.rejection
                        rejected.append(
                            {
                                "id": entry.id,
                                "line": entry.line,
                                "stage": stage,
                                "reason": verdict.reason,
                                "detail": verdict.detail,
                                "record": entry.data if entry.data is not None else entry.raw,
                            },
                        )
                bar.update(len(chunk))
                kept.sync()
                rejected.sync()
    finally:
        bar.close()
        cleaner.close()
    summary = summarise(out / KEPT, out / REJECTED, input_ids, config.stages)
    summary["seconds_this_run"] = round(time.perf_counter() - started, 3)
    summary["resumed_from"] = len(done)
    write_report(out / REPORT, summary, input_path)
    if config.shard_size > 0:
        from pallava.data.io import iter_records
        from pallava.data.shards import write_shards

        shutil.rmtree(out / "shards", ignore_errors=True)
        write_shards(
            iter_records(out / KEPT), out / "shards", records_per_shard=config.shard_size, progress=progress
        )
    return summary
