"""Answer normalisation, one function per scorer family.

Each published scorer normalises answers differently, and those differences move the
headline numbers by several points; keeping the rules side by side makes them explicit.
All functions are pure and take/return plain strings.
"""

from __future__ import annotations

import re

# PA-LLaVA's evaluation scripts delete these characters after lower-casing.
PAPER_REMOVED_CHARS = ",.'!?\"()*#:;~"
_PAPER_TABLE = str.maketrans("", "", PAPER_REMOVED_CHARS)
_XRAY = re.compile(r"x[ -]ray")

# LLaVA-Med (VQA-v2 style) rules: punctuation, article removal, number words to digits.
LLAVA_MED_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
LLAVA_MED_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
LLAVA_MED_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_SPACES = re.compile(r"\s+")


def normalize_paper(text: str) -> str:
    """PA-LLaVA's normalisation: lowercase, "x ray"/"x-ray" -> "xray", " - " -> "-",
    delete , . ' ! ? " ( ) * # : ; ~ and strip the ends."""
    text = _XRAY.sub("xray", text.lower()).replace(" - ", "-")
    return text.translate(_PAPER_TABLE).strip()


def normalize_strict(text: str) -> str:
    """Our normalisation: the paper's rules, then runs of whitespace collapsed and any
    punctuation left at either end removed ("-- no --" -> "no")."""
    text = _SPACES.sub(" ", normalize_paper(text))
    return _EDGE_PUNCT.sub("", text)


def normalize_llava_med(text: str) -> str:
    """LLaVA-Med's (VQA-v2 style) normalisation, rule for rule.

    Each punctuation mark is deleted when it touches a space in the original text (or the
    text holds a digit-comma-digit run), otherwise replaced by a space; periods not followed
    by a digit are deleted; then lowercase, number words ("two") become digits, articles
    (a, an, the) are dropped, and commas removed. The VQA-v2 contraction re-spelling
    ("dont" -> "don't") is not reproduced: PathVQA answers contain no such words.
    """
    stripped = text
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in LLAVA_MED_PUNCT:
        touches_space = f"{mark} " in text or f" {mark}" in text
        stripped = stripped.replace(mark, "" if touches_space or has_number_comma else " ")
    stripped = _PERIOD_NOT_BEFORE_DIGIT.sub("", stripped)
    words = [LLAVA_MED_NUMBER_WORDS.get(word, word) for word in stripped.lower().split()]
    return " ".join(word for word in words if word not in LLAVA_MED_ARTICLES).replace(",", "")


def first_yes_no(normalized: str) -> str | None:
    """The first whole word that is "yes" or "no", or None.

    Whole words only: "normal", "not" and "nodule" are not "no"; "no, it is not" is "no".
    """
    for word in _WORD.findall(normalized):
        if word in ("yes", "no"):
            return word
    return None
