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

# Every caption template names the organ and the diagnosis within its first dozen words: PLIP reads only the
# first 30 tokens of a caption.

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
    "Histopathology image showing {name} in {organ} tissue, stained with haematoxylin and eosin and "
    "viewed at high magnification with the characteristic cellular architecture of this diagnosis.",
    "This microscopic section of human {organ} shows {name}; the morphology of the cells and the "
    "arrangement of the tissue in this field are typical of that diagnosis.",
    "Photomicrograph of {name} in a {organ} specimen stained with H&E; the tissue pattern and "
    "nuclear features visible in this field support this interpretation.",
    "A histology tile from a human {organ} sample demonstrating {name}. The image captures a "
    "representative region of the tissue at high power under the microscope.",
    "H&E stained section of {organ} with {name}: the features seen in this field, including the cell "
    "shapes, nuclei and tissue organisation, are consistent with this diagnosis.",
    "Light microscopy of human {organ} tissue in which {name} is seen; the stain highlights the "
    "nuclei in purple and the cytoplasm and stroma in shades of pink.",
    "A {organ} biopsy with {name}: this H&E field shows the growth pattern, the nuclear detail and the "
    "relation of the cells to the surrounding stroma that pathologists use to make this diagnosis.",
    "Diagnosis: {name}. Site: {organ}. The haematoxylin and eosin section shows a representative area "
    "of the lesion with its typical cytology and tissue architecture.",
    "Histopathology of the {organ} with {name}. Nuclei are stained blue-purple by haematoxylin and the "
    "cytoplasm and extracellular matrix pink by eosin in this field of view.",
    "Resection specimen from the {organ}, H&E stain, showing {name}; the field was chosen because it "
    "displays the defining morphological features of this entity.",
)

# Added to some captions when the class says whether it is malignant.
_MALIGNANT_SENTENCES = (
    "The lesion is malignant.",
    "These findings indicate a malignant tumour.",
    "This is a carcinoma, a malignant neoplasm.",
)
_BENIGN_SENTENCES = (
    "There is no evidence of malignancy.",
    "The tissue is benign.",
    "No carcinoma is seen in this field.",
)


def caption_for_class(info, rng: random.Random) -> str:
    """A caption naming the organ and the diagnosis (canonical name or a synonym) in varied wording,
    sometimes with a sentence saying whether it is malignant."""
    name = rng.choice(info.all_names())
    caption = rng.choice(_CAPTION_TEMPLATES).format(organ=info.organ or "human", name=name)
    if info.malignant is not None and rng.random() < 0.5:
        caption += " " + rng.choice(_MALIGNANT_SENTENCES if info.malignant else _BENIGN_SENTENCES)
    return caption


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

# Class names listed in the question, answered with a name (the zero-shot classification protocol).
_NAMED_TEMPLATES: tuple[str, ...] = (
    "Which of the following best describes this image: {names}? Answer with one of these names only.",
    "Which of these diagnoses fits this image: {names}? Answer with the name.",
    "Choose the diagnosis among {names}. Reply with the name only.",
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
        "dataset": item.dataset,
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
        caption = caption_for_class(label_map[item.label], rng)
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


MAX_CHOICE_OPTIONS = 4

_ORGAN_OPEN_TEMPLATES: tuple[str, ...] = (
    "Which organ is this tissue from?",
    "From which organ was this specimen taken?",
    "What organ does this histology image show?",
)
_ORGAN_CLOSED_TEMPLATES: tuple[str, ...] = (
    "Is this tissue from the {organ}?",
    "Was this specimen taken from the {organ}?",
    "Does this image show {organ} tissue?",
)
_MALIGNANT_CLOSED_TEMPLATES: tuple[str, ...] = (
    "Is this tissue malignant?",
    "Is there carcinoma in this image?",
    "Does this image show a malignant tumour?",
)
_BENIGN_CLOSED_TEMPLATES: tuple[str, ...] = (
    "Is this tissue benign?",
    "Is this tissue free of malignancy?",
)
_MALIGNANCY_OPEN_TEMPLATES: tuple[str, ...] = (
    "Is this tissue benign or malignant?",
    "Is the lesion in this image benign or malignant?",
)


def _negative_class(info, label_map: LabelMap, rng: random.Random) -> str:
    """A wrong class for a "no" question; with several organs, half the time one of the same organ (hard)."""
    others = [label for label in label_map.labels() if label != info.label]
    if len(label_map.organs()) > 1:
        same_organ = [label for label in others if label_map[label].organ == info.organ]
        if same_organ and rng.random() < 0.5:
            return rng.choice(same_organ)
    return rng.choice(others)


def _choice_labels(info, label_map: LabelMap, rng: random.Random) -> list[str]:
    """The labels offered in a choice question: all classes, or (more than MAX_CHOICE_OPTIONS) the true one,
    another of the same organ when there is one, and others drawn across organs; in random order."""
    labels = label_map.labels()
    if len(labels) <= MAX_CHOICE_OPTIONS:
        order = labels[:]
    else:
        others = [label for label in labels if label != info.label]
        same_organ = [label for label in others if label_map[label].organ == info.organ]
        order = [info.label] + ([rng.choice(same_organ)] if same_organ else [])
        rest = [label for label in others if label not in order]
        order += rng.sample(rest, MAX_CHOICE_OPTIONS - len(order))
    rng.shuffle(order)
    return order


def _reordered(order: list[str], true_label: str, rng: random.Random) -> list[str]:
    """The same options in another order, the true one under another letter: asked twice, an image's
    choice question can only be answered by reading the letter off the list, never by remembering it."""
    others = [label for label in order if label != true_label]
    rng.shuffle(others)
    before = order.index(true_label)
    position = rng.choice([i for i in range(len(order)) if i != before])
    return others[:position] + [true_label] + others[position:]


def vqa_from_labels(items: Iterable[LabelledImage], label_map: LabelMap, seed: int = 0) -> list[VQAItem]:
    """Questions about each image, answered from its label.

    Diagnosis (every image): a yes question (true class), a no question (another class), an open question
    answered with the canonical name, a choice question whose answer is the correct option's letter (asked
    again with the options reordered, the correct one under another letter), and an
    open question listing class names (those of the image's organ) answered with one of them.
    Organ (when the map spans several organs): an open question and a yes/no question. Malignancy (when
    the class says whether it is malignant): a yes/no and a "benign or malignant?" open question.
    Yes/no answers are balanced; `meta.question` says which of diagnosis / organ / malignancy is asked.
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
    organs = label_map.organs()
    vqa = []
    for item in items:
        key = _image_key(item)
        rng = _rng(seed, key)
        true_info = label_map[item.label]
        false_info = label_map[_negative_class(true_info, label_map, rng)]
        meta = {**_generated_meta(item, "vqa_from_labels"), "question": "diagnosis"}
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
        order = _choice_labels(true_info, label_map, rng)
        question = rng.choice(_CHOICE_TEMPLATES)
        for suffix, labels in (("", order), ("-reordered", _reordered(order, item.label, rng))):
            options = [label_map[label].name for label in labels]
            letter = string.ascii_uppercase[labels.index(item.label)]
            vqa.append(
                VQAItem(f"{key}-choice{suffix}", item.path, question, letter, "choice", options, dict(meta))
            )
        vqa += _organ_and_malignancy(item, key, true_info, organs, _rng(seed, f"{key}:more"), meta)
        vqa.append(_named_choice(item, key, true_info, label_map, _rng(seed, f"{key}:named"), meta))
    return vqa


def _named_choice(
    item: LabelledImage, key: str, info, label_map: LabelMap, rng: random.Random, meta: dict
) -> VQAItem:
    """An open question listing class names (the classes of the image's organ, sometimes one more from another
    organ), answered with the canonical name."""
    same_organ = [label for label in label_map.labels() if label_map[label].organ == info.organ]
    others = [label for label in label_map.labels() if label not in same_organ]
    listed = same_organ + ([rng.choice(others)] if others and rng.random() < 0.5 else [])
    rng.shuffle(listed)
    names = "; ".join(label_map[label].name for label in listed)
    question = rng.choice(_NAMED_TEMPLATES).format(names=names)
    return VQAItem(f"{key}-named", item.path, question, info.name, "open", None, dict(meta))


def _organ_and_malignancy(
    item: LabelledImage, key: str, info, organs: list[str], rng: random.Random, meta: dict
) -> list[VQAItem]:
    """The organ and malignancy questions of one image (a separate random stream keeps the diagnosis
    questions identical to single-organ builds)."""
    extra = []
    if len(organs) > 1 and info.organ:
        organ_meta = {**meta, "question": "organ"}
        extra.append(
            VQAItem(
                f"{key}-organ-open",
                item.path,
                rng.choice(_ORGAN_OPEN_TEMPLATES),
                info.organ,
                "open",
                None,
                organ_meta,
            )
        )
        asked = info.organ if rng.random() < 0.5 else rng.choice([o for o in organs if o != info.organ])
        extra.append(
            VQAItem(
                f"{key}-organ-closed",
                item.path,
                rng.choice(_ORGAN_CLOSED_TEMPLATES).format(organ=asked),
                "yes" if asked == info.organ else "no",
                "closed",
                None,
                dict(organ_meta),
            )
        )
    if info.malignant is not None:
        malignancy_meta = {**meta, "question": "malignancy"}
        ask_malignant = rng.random() < 0.5
        templates = _MALIGNANT_CLOSED_TEMPLATES if ask_malignant else _BENIGN_CLOSED_TEMPLATES
        answer = "yes" if info.malignant == ask_malignant else "no"
        extra.append(
            VQAItem(
                f"{key}-malignancy-closed",
                item.path,
                rng.choice(templates),
                answer,
                "closed",
                None,
                malignancy_meta,
            )
        )
        extra.append(
            VQAItem(
                f"{key}-malignancy-open",
                item.path,
                rng.choice(_MALIGNANCY_OPEN_TEMPLATES),
                "malignant" if info.malignant else "benign",
                "open",
                None,
                dict(malignancy_meta),
            )
        )
    return extra


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


# A choice question's trained answer: the option's text, then its letter (`choice_answer`). Stage 2's letter
# weight (`train.answer_weights`) finds the letter by the word before it.
CHOICE_ANSWER = "{option}, option {letter}"


def choice_answer(item: VQAItem) -> str:
    """The trained answer to a choice question: the option's text, then its letter ("lung adenocarcinoma,
    option C"), which `eval.choice.extract_option_letter` reads by the letter.

    A bare letter first asks the model to bind what it sees to a letter before it has said what it sees; the
    tiny assistant learnt a favourite letter per dataset instead (multiple choice 0.32-0.42). Naming first,
    the letter is a copy from the option list (0.82-0.91, docs/training.md).
    """
    letter = item.answer.strip().upper()
    letters = string.ascii_uppercase[: len(item.options or [])]
    if len(letter) != 1 or letter not in letters:
        raise ValueError(
            f"question {item.id}: choice answer {item.answer!r} is not the letter of one of its "
            f"{len(item.options or [])} options"
        )
    return CHOICE_ANSWER.format(option=item.options[letters.index(letter)].strip(), letter=letter)


def stage2_conversation(item: VQAItem) -> Conversation:
    """A VQA item as a single-turn LLaVA conversation with `<image>` leading the question."""
    if item.answer_type == "closed":
        answer = item.answer.strip().lower()
    elif item.answer_type == "choice":
        answer = choice_answer(item)
    else:
        answer = item.answer.strip()
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
