"""PathVQA in its three public forms: Hugging Face Parquet, the original pickles, and the text JSON.

Pickles are read with a restricted unpickler that only rebuilds plain containers, strings and numbers:
a pickle naming any other class or function is refused, so an untrusted file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pallava.data.io import read_json_list
from pallava.data.records import VQAItem

CLOSED_ANSWERS = frozenset({"yes", "no"})
_SAFE_GLOBALS = frozenset(
    {
        (module, n)
        for module in ("builtins", "__builtin__")  # protocol <= 2 spells it __builtin__
        for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool")
    }
    | {("collections", "OrderedDict")}
)


def answer_type_of(answer: str) -> str:
    """PathVQA's split: yes/no answers are closed, everything else is open."""
    return "closed" if answer.strip().lower() in CLOSED_ANSWERS else "open"


def _vqa(record_id: str, image: str, question: Any, answer: Any, where: str, meta: dict[str, Any]) -> VQAItem:
    for field, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field '{field}' must be a non-empty string, got {value!r:.60}")
    answer = answer.strip()
    kind = answer_type_of(answer)
    return VQAItem(
        record_id, image, question.strip(), answer.lower() if kind == "closed" else answer, kind, None, meta
    )


def _image_suffix(data: bytes, name: str | None) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return Path(name).suffix if name and Path(name).suffix else ".img"


def read_pathvqa_parquet(path: str | Path, image_dir: str | Path | None = None) -> Iterator[VQAItem]:
    """Hub Parquet (`image` {bytes, path}, `question`, `answer`), streamed by batch.

    Embedded image bytes are written once per distinct image to `image_dir/<sha1>.<ext>` (questions on
    the same image share the file); rows with only `image.path` keep that path.
    """
    path = Path(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for non-Parquet input
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    missing = [c for c in ("image", "question", "answer") if c not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: PathVQA Parquet needs columns image, question, answer; missing {missing}")
    out = Path(image_dir) if image_dir is not None else None
    written: set[str] = set()
    row = 0
    for batch in parquet.iter_batches(columns=["image", "question", "answer"], batch_size=512):
        for entry in batch.to_pylist():
            where = f"{path}: row {row}"
            image = entry["image"]
            if isinstance(image, dict) and image.get("bytes"):
                if out is None:
                    raise ValueError(
                        f"{path}: rows embed image bytes; give an image folder to extract them into"
                    )
                data = image["bytes"]
                name = hashlib.sha1(data).hexdigest()[:20] + _image_suffix(data, image.get("path"))
                if name not in written:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / name).write_bytes(data)
                    written.add(name)
                image_path = str(out / name)
            elif isinstance(image, dict) and image.get("path"):
                image_path = image["path"]
            else:
                raise ValueError(f"{where}: field 'image' has neither bytes nor path")
            yield _vqa(
                f"pathvqa:{path.stem}:{row}",
                image_path,
                entry["question"],
                entry["answer"],
                where,
                {"source": "pathvqa"},
            )
            row += 1


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings and numbers only; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}' (only plain containers and strings are allowed)"
        )


def load_pickle_safely(path: str | Path) -> Any:
    """Load a pickle through `RestrictedUnpickler`; a refused or broken pickle raises ValueError naming the
    file."""
    path = Path(path)
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as error:
        raise ValueError(f"{path}: cannot load pickle safely: {error}") from None


def _best_label(label: Any, where: str) -> str:
    if isinstance(label, str):
        return label
    if isinstance(label, dict) and label:
        return max(label.items(), key=lambda item: item[1])[0]
    raise ValueError(
        f"{where}: field 'label' must be a non-empty {{answer: score}} object, got {label!r:.60}"
    )


def read_pathvqa_pickle(path: str | Path, image_root: str | Path | None = None) -> Iterator[VQAItem]:
    """Original PathVQA pickles: a list of `{img_id, sent, label: {answer: score}}` (the LXMERT form)
    or `{image, question, answer}`. Images become `<image_root>/<img_id>.jpg`."""
    path = Path(path)
    data = load_pickle_safely(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of question records, got {type(data).__name__}")
    for index, entry in enumerate(data):
        where = f"{path}: record {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        if "sent" in entry or "img_id" in entry:
            image, question, answer = (
                entry.get("img_id"),
                entry.get("sent"),
                _best_label(entry.get("label"), where),
            )
            image_field = "img_id"
        else:
            image, question, answer = entry.get("image"), entry.get("question"), entry.get("answer")
            image_field = "image"
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: field '{image_field}' must be a non-empty string")
        name = image if Path(image).suffix else f"{image}.jpg"
        image_path = str(Path(image_root) / name) if image_root is not None else name
        record_id = f"pathvqa:{path.stem}:{entry.get('question_id', index)}"
        yield _vqa(record_id, image_path, question, answer, where, {"source": "pathvqa"})


def read_pathvqa_json(path: str | Path, image_root: str | Path | None = None) -> Iterator[VQAItem]:
    """PathVQA text JSON: `[{img_id, sentf: {pvqa: [q...]}, labelf: {pvqa: [{answer: score}...]}}]`."""
    path = Path(path)
    for index, entry in enumerate(read_json_list(path)):
        where = f"{path}: record {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        image = entry.get("img_id")
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: field 'img_id' must be a non-empty string")
        questions = (entry.get("sentf") or {}).get("pvqa") if isinstance(entry.get("sentf"), dict) else None
        labels = (entry.get("labelf") or {}).get("pvqa") if isinstance(entry.get("labelf"), dict) else None
        if not isinstance(questions, list):
            raise ValueError(f"{where}: field 'sentf.pvqa' must be a list of questions")
        if not isinstance(labels, list):
            raise ValueError(f"{where}: field 'labelf.pvqa' must be a list of {{answer: score}} objects")
        if len(questions) != len(labels):
            raise ValueError(
                f"{where}: fields 'sentf.pvqa' ({len(questions)}) and 'labelf.pvqa' ({len(labels)}) "
                "differ in length"
            )
        image_path = str(Path(image_root) / f"{image}.jpg") if image_root is not None else f"{image}.jpg"
        for i, (question, label) in enumerate(zip(questions, labels, strict=True)):
            item_where = f"{where} ({image}), question {i}"
            yield _vqa(
                f"pathvqa:{path.stem}:{image}:{i}",
                image_path,
                question,
                _best_label(label, item_where),
                item_where,
                {"source": "pathvqa", "img_id": image},
            )
