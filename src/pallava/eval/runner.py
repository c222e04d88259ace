"""Run the assistant over evaluation items: batched greedy answers, written as they arrive, resumable.

The runner only needs an object with `ask_batch(images, questions, batch_size=..., **options)` and
`tile_grid(image)` (the `pallava.inference.PaLlava` interface), so orchestration is testable
without a model and the same code drives the tiny and the paper preset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from pallava.data.labels import LabelMap
from pallava.data.records import LabelledImage, VQAItem
from pallava.eval.choice import permute_options
from pallava.eval.predictions import PredictionWriter
from pallava.eval.tasks import prompt_of
from pallava.processing.loading import DEFAULT_MAX_PIXELS, image_problem

UNMAPPED = "(unmapped)"


def model_tokenize(model_dir: str | Path) -> Callable[[str], list[int]]:
    """The model folder's tokenizer as text -> token ids (no special tokens): what the `paper` scorer
    counts its open recall in, as the authors do. Only the tokenizer is read, no weights."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{model_dir}: no tokenizer to count the paper's open recall with ({error})"
        ) from None
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


class Assistant(Protocol):
    """What the runner needs from a model (satisfied by `pallava.inference.PaLlava`)."""

    def ask_batch(
        self, images: Sequence[Any], questions: Sequence[str], batch_size: int = 8, **options: Any
    ) -> list[str]: ...

    def tile_grid(self, image: Any) -> tuple[int, int]: ...

    def answer_log_likelihoods(self, image: Any, question: str, answers: Sequence[str]) -> list[float]: ...


# How the class-choice question is answered: `generated` (greedy text, mapped to a class by its names; an
# answer outside them counts as wrong) or `likelihood` (the class name the model is likeliest to give).
CLASS_ANSWERS = ("generated", "likelihood")


def with_option_orders(items: Sequence[VQAItem], n_orders: int, seed: int = 0) -> list[VQAItem]:
    """Items followed, for each choice item, by re-ordered copies (`<id>~p<k>`, `meta.base_id`),
    so that the report can measure whether answers follow content or position."""
    if n_orders < 1:
        raise ValueError(f"the number of option orders must be at least 1, got {n_orders}")
    expanded: list[VQAItem] = []
    for item in items:
        expanded.append(item)
        if item.answer_type != "choice" or n_orders == 1:
            continue
        orders = permute_options(item.options or [], item.answer.strip().upper(), n_orders, seed)
        for k, (options, letter) in enumerate(orders[1:], start=1):
            meta = {**item.meta, "base_id": item.id}
            expanded.append(replace(item, id=f"{item.id}~p{k}", answer=letter, options=options, meta=meta))
    return expanded


def check_images(images: Sequence[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a dataset before any answer is computed when some of its images cannot be read (missing,
    undecodable, over the pixel limit): one error names them all, where a bad image met half-way through
    would stop the run part-way, one bad file at a time. Reads headers only."""
    distinct = list(dict.fromkeys(images))
    problems = {image: why for image in distinct if (why := image_problem(image, max_pixels))}
    if not problems:
        return
    shown = "; ".join(f"{image}: {why}" for image, why in list(problems.items())[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    hints = ["Fix or remove them (`pallava data clean` lists every unreadable image of a dataset)"]
    if any("over the limit" in why for why in problems.values()):
        hints.append("raise the pixel limit with --max-pixels")
    raise ValueError(
        f"{len(problems)} of {len(distinct)} image(s) cannot be read: {shown}{more}. {'; '.join(hints)}"
    )


class _Layouts:
    """Image size and tile grid per image path, computed once (many questions share an image)."""

    def __init__(self, assistant: Assistant) -> None:
        self.assistant = assistant
        self.cache: dict[str, dict[str, Any]] = {}

    def __call__(self, image: str) -> dict[str, Any]:
        if image not in self.cache:
            with Image.open(image) as handle:
                width, height = handle.size
            cols, rows = self.assistant.tile_grid(image)
            self.cache[image] = {"image_size": [width, height], "grid": [cols, rows], "tiles": cols * rows}
        return self.cache[image]


def _ordered(writer: PredictionWriter, ids: list[str], path: Path) -> list[dict[str, Any]]:
    by_id = {str(record["id"]): record for record in writer.records}
    foreign = set(by_id) - set(ids)
    if foreign:
        example = sorted(foreign)[0]
        raise ValueError(
            f"{path} holds {len(foreign)} prediction(s) for questions not in this dataset (e.g. "
            f"{example!r}); "
            "it belongs to another run: choose a new output folder"
        )
    return [by_id[i] for i in ids]


def _answered_style(writer: PredictionWriter, style: str | None, path: Path) -> str:
    """The prompt style of this run: `style`, else the one the file was answered with (else `pallava`);
    one file never mixes two styles."""
    used = {str(record.get("prompt_style", "pallava")) for record in writer.records}
    chosen = style or (used.pop() if len(used) == 1 else "pallava")
    if used - {chosen}:
        raise ValueError(
            f"{path} holds answers to {'/'.join(sorted(used))}-style prompts; rerun with "
            f"--prompt-style {'/'.join(sorted(used))} or choose a new output folder"
        )
    return chosen


def run_vqa(
    assistant: Assistant,
    items: Sequence[VQAItem],
    predictions_path: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    prompt_style: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Answer every item not yet in `predictions_path`, appending one JSONL record per answer.

    `prompt_style` words the questions (`pallava` or `paper`, see `prompt_of`; default: the style the
    file was answered with, else `pallava`). Returns all records (old and new) in item order: id, question,
    prediction, reference, answer_type, options, image, image_size, grid, tiles, prompt_style (+ base_id
    for re-ordered copies). Every image is checked first (`check_images`, with the assistant's pixel limit
    `max_pixels`).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    path = Path(predictions_path)
    check_images([item.image for item in items], max_pixels)
    layouts = _Layouts(assistant)
    with PredictionWriter(path) as writer:
        style = _answered_style(writer, prompt_style, path)
        pending = [item for item in items if item.id not in writer.done]
        bar = tqdm(
            total=len(items),
            initial=len(items) - len(pending),
            desc="eval vqa",
            unit="q",
            disable=not progress,
        )
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            answers = assistant.ask_batch(
                [i.image for i in chunk],
                [prompt_of(i, style) for i in chunk],
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )
            for item, answer in zip(chunk, answers, strict=True):
                record = {
                    "id": item.id,
                    "question": item.question,
                    "prediction": answer,
                    "reference": item.answer,
                    "answer_type": item.answer_type,
                    "options": item.options,
                    "image": item.image,
                    **layouts(item.image),
                    "prompt_style": style,
                }
                if "base_id" in item.meta:
                    record["base_id"] = item.meta["base_id"]
                writer.write(record)
            bar.update(len(chunk))
        bar.close()
        return _ordered(writer, [item.id for item in items], path)


def class_answering(class_answers: str, max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """How the class-choice answers were obtained, for reports."""
    if class_answers == "likelihood":
        return {"decoding": "likeliest class name (log-probability of each)", "batch_size": 1}
    return {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size}


def zeroshot_question(label_map: LabelMap) -> str:
    """The class-choice question: every class name, answer with one of them."""
    names = "; ".join(label_map.names())
    return f"Which of the following best describes this image: {names}? Answer with one of these names only."


def run_zeroshot(
    assistant: Assistant,
    images: Sequence[LabelledImage],
    label_map: LabelMap,
    predictions_path: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    progress: bool = True,
    class_answers: str = "generated",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Ask the class-choice question about each image and map the answer to a label.

    `generated`: the answer maps only when it equals a class name, synonym or label after normalisation;
    anything else is recorded as `(unmapped)` (wrong, and counted). `likelihood`: the class whose name the
    model is likeliest to answer (each name's log-probability is recorded). Resumable and checked like
    `run_vqa`.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if class_answers not in CLASS_ANSWERS:
        raise ValueError(f"class answers must be one of {', '.join(CLASS_ANSWERS)}, got {class_answers!r}")
    unknown = sorted({item.label for item in images} - set(label_map))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the label map (known: {', '.join(label_map)})")
    path = Path(predictions_path)
    check_images([item.path for item in images], max_pixels)
    question = zeroshot_question(label_map)
    with PredictionWriter(path) as writer:
        answered = {"likelihood" if "log_likelihoods" in r else "generated" for r in writer.records}
        if answered - {class_answers}:  # one file never mixes the two ways of answering
            raise ValueError(
                f"{path} holds class answers taken as {'/'.join(sorted(answered))}; rerun with that "
                "--class-answers or choose a new output folder"
            )
        pending = [item for item in images if item.path not in writer.done]
        bar = tqdm(
            total=len(images),
            initial=len(images) - len(pending),
            desc="eval zeroshot",
            unit="img",
            disable=not progress,
        )
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            if class_answers == "likelihood":
                answers, scores = likeliest_names(assistant, [i.path for i in chunk], question, label_map)
            else:
                answers = assistant.ask_batch(
                    [i.path for i in chunk],
                    [question] * len(chunk),
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                )
                scores = [None] * len(chunk)
            for item, answer, score in zip(chunk, answers, scores, strict=True):
                writer.write(
                    {
                        "id": item.path,
                        "question": question,
                        "prediction": answer,
                        "reference": item.label,
                        "answer_type": "class",
                        "predicted_label": label_map.label_for(answer) or UNMAPPED,
                        "image": item.path,
                        "cluster": item.cluster,
                        **({"log_likelihoods": score} if score is not None else {}),
                    }
                )
            bar.update(len(chunk))
        bar.close()
        return _ordered(writer, [item.path for item in images], path)


def likeliest_names(
    assistant: Assistant, images: Sequence[str], question: str, label_map: LabelMap
) -> tuple[list[str], list[dict[str, float]]]:
    """For each image, the class name the model is likeliest to answer, and every name's log-probability."""
    names = label_map.names()
    answers, scores = [], []
    for image in images:
        values = assistant.answer_log_likelihoods(image, question, names)
        scores.append({name: round(value, 4) for name, value in zip(names, values, strict=True)})
        answers.append(names[max(range(len(names)), key=values.__getitem__)])
    return answers, scores
