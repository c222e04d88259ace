"""Training-set builders: captions/VQA generated from labelled images, and LLaVA conversations.

Randomness is seeded per record (`Random(f"{seed}:{id}")`), so a record's output does not depend on
which other records are in the batch: filtering or sharding a corpus never changes the samples.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Iterable
from pathlib import Path

from pallava.data.labels import LabelMap
from pallava.data.records import IMAGE_TOKEN, CaptionPair, Conversation, LabelledImage, VQAItem

# Stage-1 instructions (our own phrasings; the caption is the answer).
CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image.",
    "Describe this pathology image.",
    "What does this image show?",
    "Give a caption for this image.",
    "Write a short description of this histology image.",
    "Summarize the main findings in the picture.",
    "Explain what is visible in this slide.",
    "Provide a description of the tissue shown.",
    "What can you see in this image?",
    "Describe the histological features in this image.",
    "Write a caption describing this figure.",
    "Characterize the tissue in this picture.",
    "Tell me about this image.",
    "Report what this microscopy image shows.",
    "Describe the morphology seen here.",
    "Give a concise account of this image.",
    "Summarize the content of this pathology figure.",
    "What is depicted in this image?",
    "Interpret this image briefly.",
    "Render a clear and concise description of this image.",
)

CLOSED_INSTRUCTION = "Answer yes or no."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices."

_CAPTION_TEMPLATES: tuple[str, ...] = (
    "Haematoxylin and eosin stained histopathology image of {organ} tissue showing {name}, "
    "viewed at high magnification with the characteristic cellular architecture of this diagnosis.",
    "This microscopic section of human {organ} shows {name}; the morphology of the cells and the "
    "arrangement of the tissue in this field are typical of that diagnosis.",
    "Photomicrograph of a {organ} specimen stained with H&E. The field shows {name}, and the "
    "tissue pattern and nuclear features visible here support this interpretation.",
    "A histology tile from a human {organ} sample demonstrating {name}. The image captures a "
    "representative region of the tissue at high power under the microscope.",
    "H&E stained section of {organ}: the features seen in this field, including the cell shapes, "
    "nuclei and tissue organisation, are consistent with {name}.",
    "Light microscopy of human {organ} tissue in which {name} is seen; the stain highlights the "
    "nuclei in purple and the cytoplasm and stroma in shades of pink.",
)

_CLOSED_TEMPLATES: tuple[str, ...] = (
    "Is this {name}?",
    "Does this image show {name}?",
    "Is the diagnosis {name}?",
    "Is this tissue consistent with {name}?",
    "Does this slide show {name}?",
)

_OPEN_TEMPLATES: tuple[str, ...] = (
    "What is the diagnosis?",
    "What tissue is shown in this image?",
    "What does this histology image show?",
    "Which diagnosis best fits this image?",
    "What is the most likely diagnosis for this tissue?",
)

_CHOICE_TEMPLATES: tuple[str, ...] = (
    "Which of the following best describes this image?",
    "What is the diagnosis?",
    "Which tissue type is shown?",
)


def _rng(seed: int, key: str) -> random.Random:
    return random.Random(f"{seed}:{key}")


def _image_key(item: LabelledImage) -> str:
    """A stable id for a labelled image: file stem plus a short hash of its full path."""
    digest = hashlib.sha1(item.path.encode("utf-8")).hexdigest()[:8]
    return f"{Path(item.path).stem}-{digest}"


def _check_labels(items: list[LabelledImage], label_map: LabelMap) -> None:
    for item in items:
        if item.label not in label_map:
            raise ValueError(
                f"image {item.path}: field 'label': '{item.label}' is not in the label map "
                f"(known: {', '.join(label_map)})"
            )


def _generated_meta(item: LabelledImage, generator: str) -> dict[str, object]:
    return {
        "generated": True,
        "generator": generator,
        "label": item.label,
        "cluster": item.cluster,
        "split": item.split,
    }


def captions_from_labels(
    items: Iterable[LabelledImage], label_map: LabelMap, seed: int = 0
) -> list[CaptionPair]:
    """One generated caption per image: a random template filled with the class name or a synonym."""
    items = list(items)
    _check_labels(items, label_map)
    pairs = []
    for item in items:
        key = _image_key(item)
        rng = _rng(seed, key)
        info = label_map[item.label]
        caption = rng.choice(_CAPTION_TEMPLATES).format(
            organ=info.organ or "human", name=rng.choice(info.all_names())
        )
        pairs.append(
            CaptionPair(
                image=item.path,
                caption=caption,
                id=f"{key}-caption",
                source="generated",
                meta=_generated_meta(item, "captions_from_labels"),
            )
        )
    return pairs


def vqa_from_labels(items: Iterable[LabelledImage], label_map: LabelMap, seed: int = 0) -> list[VQAItem]:
    """Per image: a yes question (true class), a no question (another class), an open and a choice item.

    Yes/no answers are therefore exactly balanced. Open answers are the canonical name; choice items
    list every class in a seeded random order and the answer is the correct option's letter.
    """
    items = list(items)
    if len(label_map) < 2:
        raise ValueError("vqa_from_labels needs a label map with at least 2 classes (for 'no' questions)")
    if len(label_map) > len(string.ascii_uppercase):
        raise ValueError(
            f"vqa_from_labels: {len(label_map)} classes exceed the {len(string.ascii_uppercase)} option "
            "letters"
        )
    _check_labels(items, label_map)
    labels = label_map.labels()
    vqa = []
    for item in items:
        key = _image_key(item)
        rng = _rng(seed, key)
        true_info = label_map[item.label]
        false_info = label_map[rng.choice([label for label in labels if label != item.label])]
        meta = _generated_meta(item, "vqa_from_labels")
        for suffix, info, answer in (("yes", true_info, "yes"), ("no", false_info, "no")):
            question = rng.choice(_CLOSED_TEMPLATES).format(name=rng.choice(info.all_names()))
            vqa.append(
                VQAItem(f"{key}-closed-{suffix}", item.path, question, answer, "closed", None, dict(meta))
            )
        vqa.append(
            VQAItem(
                f"{key}-open",
                item.path,
                rng.choice(_OPEN_TEMPLATES),
                true_info.name,
                "open",
                None,
                dict(meta),
            )
        )
        order = labels[:]
        rng.shuffle(order)
        options = [label_map[label].name for label in order]
        letter = string.ascii_uppercase[order.index(item.label)]
        vqa.append(
            VQAItem(
                f"{key}-choice",
                item.path,
                rng.choice(_CHOICE_TEMPLATES),
                letter,
                "choice",
                options,
                dict(meta),
            )
        )
    return vqa


def stage1_conversation(caption: CaptionPair, seed: int = 0) -> Conversation:
    """A caption as a LLaVA conversation: random instruction, `<image>` before or after it."""
    rng = _rng(seed, caption.id)
    instruction = rng.choice(CAPTION_INSTRUCTIONS)
    prompt = f"{IMAGE_TOKEN}\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n{IMAGE_TOKEN}"
    return Conversation(
        id=caption.id,
        image=caption.image,
        conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": caption.caption}],
        meta={"stage": 1, "source": caption.source, **caption.meta},
    )


def stage1_conversations(captions: Iterable[CaptionPair], seed: int = 0) -> list[Conversation]:
    """Stage-1 (domain alignment) samples from caption pairs."""
    return [stage1_conversation(caption, seed) for caption in captions]


def vqa_prompt(item: VQAItem) -> str:
    """The question text the assistant sees (no image token): shared by training and evaluation."""
    question = item.question.strip()
    if item.answer_type == "closed":
        return f"{question}\n{CLOSED_INSTRUCTION}"
    if item.answer_type == "choice":
        options = "\n".join(
            f"{string.ascii_uppercase[i]}. {option}" for i, option in enumerate(item.options or [])
        )
        return f"{question}\nOptions:\n{options}\n{CHOICE_INSTRUCTION}"
    return question


def stage2_conversation(item: VQAItem) -> Conversation:
    """A VQA item as a single-turn LLaVA conversation with `<image>` leading the question."""
    answer = item.answer.strip().lower() if item.answer_type == "closed" else item.answer.strip()
    return Conversation(
        id=item.id,
        image=item.image,
        conversations=[
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{vqa_prompt(item)}"},
            {"from": "gpt", "value": answer},
        ],
        meta={"stage": 2, "answer_type": item.answer_type, **item.meta},
    )


def stage2_conversations(items: Iterable[VQAItem]) -> list[Conversation]:
    """Stage-2 (instruction tuning) samples from VQA items."""
    return [stage2_conversation(item) for item in items]
