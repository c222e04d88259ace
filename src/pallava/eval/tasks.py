"""Evaluation inputs: every supported format becomes a list of `VQAItem`s (or labelled images).

Parsing is delegated to the data importers and builders, so evaluation reads a file exactly as
training does; this module only picks the importer and turns LLaVA conversations into questions.
"""

from __future__ import annotations

import csv
import json
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pallava.data.builders import vqa_from_labels, vqa_prompt
from pallava.data.importers.manifest import read_labelled_images
from pallava.data.importers.pathvqa import answer_type_of, read_pathvqa_parquet
from pallava.data.importers.pmcvqa import read_pmc_vqa
from pallava.data.io import iter_records
from pallava.data.labels import LabelMap
from pallava.data.records import IMAGE_TOKEN, PROMPT_STYLES, VQAItem
from pallava.eval.choice import option_text

PROCESSOR_SETTINGS = (
    "processor_config.json"  # PaLlavaProcessor.CONFIG_NAME, read without importing transformers
)

VQA_FORMATS = ("pathvqa", "pathvqa-text", "pmcvqa", "jsonl", "manifest")
T = TypeVar("T")


def detect_format(path: str | Path) -> str:
    """Guess the format from the file: Parquet -> pathvqa, CSV header -> pmcvqa/manifest,
    PathVQA text JSON -> pathvqa-text, any other JSON/JSONL -> jsonl."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: evaluation data not found")
    if path.is_dir():  # a folder holding manifest.csv, or images in root/<class>/ folders
        return "manifest"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "pathvqa"
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            header = [column.strip() for column in next(csv.reader(handle), [])]
        if "Figure_path" in header:
            return "pmcvqa"
        if "path" in header and "label" in header:
            return "manifest"
        raise ValueError(
            f"{path}: CSV header {header} is neither PMC-VQA (Figure_path, ...) nor a manifest (path,label)"
        )
    if suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            head = handle.read(4096)
        if '"sentf"' in head or '"labelf"' in head:
            return "pathvqa-text"
    if suffix in (".json", ".jsonl"):
        return "jsonl"
    raise ValueError(
        f"{path}: cannot tell the format from the name; pass --format ({', '.join(VQA_FORMATS)})"
    )


def _conversation_item(record: dict[str, Any], where: str, image_root: Path | None) -> VQAItem:
    """A LLaVA conversation's first question/answer pair as a VQA item (prompt kept verbatim)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise ValueError(f"{where}: field 'conversations' must hold a human turn and a gpt answer")
    human, gpt = turns[0], turns[1]
    if not (
        isinstance(human, dict)
        and human.get("from") == "human"
        and isinstance(gpt, dict)
        and gpt.get("from") == "gpt"
    ):
        raise ValueError(
            f"{where}: field 'conversations' must start with a human turn followed by a gpt turn"
        )
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: field 'image' must name the image the question is about")
    prompt = str(human.get("value", "")).replace(IMAGE_TOKEN, "").strip()
    answer = str(gpt.get("value", "")).strip()
    meta = dict(record.get("meta") or {})
    answer_type = meta.get("answer_type") or record.get("answer_type") or answer_type_of(answer)
    options = record.get("options") or meta.get("options")
    meta["prompt"] = prompt
    image_path = str(image_root / image) if image_root is not None else image
    return VQAItem(str(record.get("id", where)), image_path, prompt, answer, answer_type, options, meta)


def _jsonl_items(path: Path, image_root: Path | None) -> list[VQAItem]:
    items = []
    for index, record in enumerate(iter_records(path)):
        where = f"{path}: record {index}"
        if "conversations" in record:
            items.append(_conversation_item(record, where, image_root))
            continue
        try:
            item = VQAItem.from_dict(record)
        except ValueError as error:
            raise ValueError(f"{where}: {error} (expected a LLaVA conversation or a VQA item)") from None
        if image_root is not None:
            item.image = str(image_root / item.image)
        items.append(item)
    return items


def load_vqa_items(
    path: str | Path,
    fmt: str | None = None,
    split: str | None = None,
    image_root: str | Path | None = None,
    image_dir: str | Path | None = None,
    label_map: str | None = None,
    seed: int = 0,
) -> list[VQAItem]:
    """Questions with images from any supported format.

    `image_dir` receives images embedded in PathVQA Parquet; `label_map` and `seed` drive the
    closed/open/choice questions generated from a labelled manifest. PathVQA text JSON has no
    images and is refused with an explanation.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in VQA_FORMATS:
        raise ValueError(f"unknown evaluation format {fmt!r}; choose one of {', '.join(VQA_FORMATS)}")
    if not path.exists():
        raise ValueError(f"{path}: evaluation data not found")
    if split is not None and fmt not in ("pmcvqa", "manifest"):
        raise ValueError(f"format '{fmt}' has no split column; drop --split")
    root = Path(image_root) if image_root is not None else None
    if fmt == "pathvqa-text":
        raise ValueError(
            f"{path}: PathVQA text JSON holds questions and answers but no images, so the assistant cannot "
            "be "
            "evaluated on it; use the PathVQA Parquet (with images), or score existing predictions with "
            "`pallava eval score --predictions FILE`"
        )
    if fmt == "pathvqa":
        if image_dir is None:
            raise ValueError(
                "PathVQA Parquet embeds its images: an image folder to extract them into is required"
            )
        items = list(read_pathvqa_parquet(path, image_dir))
    elif fmt == "pmcvqa":
        items = list(read_pmc_vqa(path, root, split))
    elif fmt == "manifest":
        labelled = read_labelled_images(path, split)
        items = vqa_from_labels(
            labelled, LabelMap.resolve(label_map, {i.label for i in labelled}, source="--label-map"), seed
        )
    else:
        items = _jsonl_items(path, root)
    if not items:
        raise ValueError(f"{path}: no questions found" + (f" in split '{split}'" if split else ""))
    duplicates = len(items) - len({item.id for item in items})
    if duplicates:
        raise ValueError(
            f"{path}: {duplicates} question id(s) repeat; ids must be unique to resume and score"
        )
    return items


def paper_prompt(item: VQAItem) -> str:
    """The authors' evaluation prompt: the raw question, no instruction added. A multiple-choice question
    carries its choices in PMC-VQA's own `A:text` form, one per line: the form the released model answers
    in ("B:text") and the `paper` scorer reads (the letter before the first ":")."""
    question = item.question.strip()
    if item.answer_type != "choice":
        return question
    choices = [
        f"{string.ascii_uppercase[i]}:{option_text(option)}" for i, option in enumerate(item.options or [])
    ]
    return "\n".join([question, *choices])


def prompt_of(item: VQAItem, style: str = "pallava") -> str:
    """The text the assistant is asked: a LLaVA prompt verbatim, else the shared training prompt
    (`pallava`: "Answer yes or no.", an options block) or the authors' (`paper`)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    if item.meta.get("prompt"):
        return str(item.meta["prompt"])
    return paper_prompt(item) if style == "paper" else vqa_prompt(item)


def model_prompt_style(model_dir: str | Path) -> str | None:
    """The prompt style saved in a model folder (`paper` for a converted release, `pallava` for folders
    without one); None when the folder has no processor settings."""
    path = Path(model_dir) / PROCESSOR_SETTINGS
    if not path.is_file():
        return None
    try:
        style = json.loads(path.read_text(encoding="utf-8")).get("prompt_style", "pallava")
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: not a JSON object of processor settings") from None
    if style not in PROMPT_STYLES:
        raise ValueError(
            f"{path}: field 'prompt_style' must be one of {', '.join(PROMPT_STYLES)}, got {style!r}"
        )
    return style


def sample_items(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """A seeded random subset of `limit` items, kept in input order (all items when no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]
