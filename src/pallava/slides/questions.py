"""Slide-level questions from a virtual slide's truth, and the scorers that read the answers back.

Kinds: `presence` (closed, yes/no), `diagnosis` (open: the carcinoma class, or the benign class when there
is none), `organ` (open), `location` (open: the quadrant(s) of the tissue holding tumour) and `choice`
(multiple choice over the organ's classes, answered with the option's letter and text). Training uses
several phrasings of each; evaluation asks one fixed phrasing per kind (`EVAL_QUESTIONS`).
"""

from __future__ import annotations

import random
import re

from pallava.data.labels import LabelMap
from pallava.slides.virtual import QUADRANTS

KINDS = ("presence", "diagnosis", "organ", "location", "choice")
PHRASINGS = {
    "presence": (
        "Is there carcinoma on this slide?",
        "Is there carcinoma anywhere on this slide?",
        "Does this slide show any tumour?",
        "Is cancer present anywhere in this whole slide?",
    ),
    "diagnosis": (
        "What is the diagnosis of this slide?",
        "What type of carcinoma is on this slide, if any?",
        "What does this whole slide show?",
    ),
    "organ": ("Which organ is this tissue from?", "From which organ was this slide taken?"),
    "location": ("Where on the slide is the tumour?", "In which quadrant of the tissue is the carcinoma?"),
}
EVAL_QUESTIONS = {kind: PHRASINGS[kind][0] for kind in ("presence", "diagnosis", "organ", "location")}
NO_TUMOUR = "no tumour is present"


def location_text(quadrants: list[str]) -> str:
    return " and ".join(quadrants) if quadrants else NO_TUMOUR


def diagnosis_text(truth: dict) -> str:
    return truth["tumour_class"] if truth["tumour_present"] else truth["benign_class"]


def reference(kind: str, truth: dict) -> str:
    """The reference answer of an evaluation question."""
    if kind == "presence":
        return "yes" if truth["tumour_present"] else "no"
    if kind == "diagnosis":
        return diagnosis_text(truth)
    if kind == "organ":
        return truth["organ"]
    if kind == "location":
        return location_text(truth["location"])
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def training_question(kind: str, truth: dict, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one kind for a slide, with a random phrasing (and option order for `choice`)."""
    if kind == "choice":
        names = [entry["name"] for entry in truth["label_map"].values()]
        rng.shuffle(names)
        letters = "ABCDEFGH"[: len(names)]
        options = " ".join(f"{letter}: {name}" for letter, name in zip(letters, names, strict=True))
        answer = diagnosis_text(truth)
        letter = letters[names.index(answer)]
        return f"Which of these best describes the slide? {options}", f"{letter}: {answer}"
    return rng.choice(PHRASINGS[kind]), reference(kind, truth)


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def answer_quadrants(answer: str) -> set[str]:
    text = _normal(answer)
    return {quadrant for quadrant in QUADRANTS if quadrant in text}


def score(kind: str, answer: str, truth: dict) -> bool:
    """Whether an answer is right: yes/no for presence, the class via the label map for the diagnosis, the
    organ's name, and exactly the tumour's quadrants for the location."""
    text = _normal(answer)
    if kind == "presence":
        said = text.split(" ")[0] if text else ""
        return said == ("yes" if truth["tumour_present"] else "no")
    if kind == "diagnosis":
        label_map = LabelMap.from_dict(truth["label_map"])
        expected = truth["tumour_label"] if truth["tumour_present"] else truth["benign_label"]
        return label_map.label_for(answer) == expected
    if kind == "organ":
        return text == _normal(truth["organ"])
    if kind == "location":
        return answer_quadrants(answer) == set(truth["location"])
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
