"""Multiple-choice (PMC-VQA) answers: option-letter extraction and option-order consistency.

A model may answer "B", "B:", "(B)", "The answer is B" or just repeat the option's text;
all of these must score the same, and anything we cannot map is wrong (never skipped).
"""

from __future__ import annotations

import random
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pallava.eval.normalize import normalize_strict

DEFAULT_LETTERS = "ABCD"
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])\s*[:.)]\s*")
# A bare letter at the very start, closed by punctuation or the end: "B", "B:", "(B)", "B) text", "b."
_LEADING_LETTER = re.compile(r"^\s*[\[(]?\s*([A-Za-z])\s*(?:$|[:.)\]]|\s*-\s)")
# A letter named by a keyword: "answer is B", "Answer: (c)", "option B", "correct choice is D."
_KEYWORD_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be))?\s*[:\-]?\s*[\[(]?([A-Za-z])(?=$|[\s:.)\],;!])",
    re.IGNORECASE,
)


def option_letters(options: Sequence[str] | None) -> str:
    """The letters that name the options: A, B, ... one per option (A-D when unknown)."""
    if not options:
        return DEFAULT_LETTERS
    if len(options) > 26:
        raise ValueError(f"a choice question has {len(options)} options; at most 26 are supported")
    return string.ascii_uppercase[: len(options)]


def option_text(option: str) -> str:
    """An option without a leading "A:" / "(A)" / "A." label, as PMC-VQA stores them ("A:Liver")."""
    return _OPTION_PREFIX.sub("", option, count=1).strip()


def _letter_from_keyword(text: str, letters: str) -> str | None:
    for match in _KEYWORD_LETTER.finditer(text):
        letter = match.group(1)
        # "the answer is a tumour": a lower-case "a" followed by a word is an article, not option A
        if letter.islower() and match.end() < len(text) and text[match.end()] == " ":
            continue
        if letter.upper() in letters:
            return letter.upper()
    return None


def _letter_from_text(prediction: str, options: Sequence[str], letters: str) -> str | None:
    answer = normalize_strict(prediction)
    if not answer:
        return None
    texts = [normalize_strict(option_text(option)) for option in options]
    exact = [letters[i] for i, text in enumerate(texts) if text and text == answer]
    if len(exact) == 1:
        return exact[0]
    padded = f" {answer} "
    contained = {letters[i]: text for i, text in enumerate(texts) if text and f" {text} " in padded}
    # an option inside a longer matched option ("carcinoma" in "squamous cell carcinoma") is not a pick
    picked = [
        letter
        for letter, text in contained.items()
        if not any(other != text and f" {text} " in f" {other} " for other in contained.values())
    ]
    return picked[0] if len(picked) == 1 else None


def extract_option_letter(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none (scored wrong).

    Tried in order: a leading letter ("B", "B:", "(B)", "B) Liver"), a letter after
    "answer"/"option"/"choice" ("The answer is B"), then the text of exactly one option
    (an option nested in another matched one is ignored; two separate matches -> None).
    """
    letters = option_letters(options)
    leading = _LEADING_LETTER.match(prediction)
    if leading:
        letter = leading.group(1)
        whole = prediction.strip().strip("[]():.").strip()
        # A capital letter is a label; a lower-case one only when it is the whole answer ("b", "(b)").
        if (letter.isupper() or whole == letter) and letter.upper() in letters:
            return letter.upper()
    keyword = _letter_from_keyword(prediction, letters)
    if keyword:
        return keyword
    if options:
        return _letter_from_text(prediction, options, letters)
    return None


def paper_option_letter(prediction: str) -> str:
    """PA-LLaVA's rule: the text before the first ":" (stripped) is taken as the letter; the scorer then
    compares it with the reference letter, both lower-cased."""
    return prediction.split(":", 1)[0].strip()


def reference_letter(reference: str, options: Sequence[str] | None, where: str = "reference") -> str:
    """The correct letter of a choice item: the reference itself when it is a letter
    ("B", "B:", "(B)"), else the letter of the option whose text equals it."""
    letters = option_letters(options)
    cleaned = reference.strip().strip("[]():.").strip()
    if len(cleaned) == 1 and cleaned.upper() in letters:
        return cleaned.upper()
    if options:
        wanted = normalize_strict(option_text(reference))
        for index, option in enumerate(options):
            if normalize_strict(option_text(option)) == wanted:
                return letters[index]
    raise ValueError(
        f"{where}: {reference!r} is neither an option letter ({', '.join(letters)}) nor an option's text"
    )


def permute_options(
    options: Sequence[str], answer_letter: str, n_orders: int, seed: int = 0
) -> list[tuple[list[str], str]]:
    """`n_orders` distinct option orders (the original first), each with its correct letter.

    Option labels ("A:") are stripped so the letter always matches the position. Fewer
    orders come back when the options have fewer distinct permutations.
    """
    letters = option_letters(options)
    if answer_letter not in letters:
        raise ValueError(f"answer letter {answer_letter!r} is not one of {letters}")
    texts = [option_text(option) for option in options]
    correct = texts[letters.index(answer_letter)]
    rng = random.Random(seed)
    orders = [texts]
    seen = {tuple(texts)}
    attempts = 0
    while len(orders) < n_orders and attempts < 100 * n_orders:
        attempts += 1
        order = texts[:]
        rng.shuffle(order)
        if tuple(order) not in seen:
            seen.add(tuple(order))
            orders.append(order)
    return [(order, letters[order.index(correct)]) for order in orders]


def chosen_option(record: Mapping[str, Any]) -> str | None:
    """The option text a choice record's prediction picks (order-independent), or None."""
    options = record.get("options") or []
    letter = extract_option_letter(str(record.get("prediction") or ""), options)
    if letter is None or not options:
        return None
    return normalize_strict(option_text(options[option_letters(options).index(letter)]))


def option_consistency(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Accuracy across option orders and whether the model picks the same option in every order.

    Records of one question share `base_id` (defaults to `id`). Returns the accuracy over
    all (question, order) pairs, the share of questions answered with the same option text
    in every order (`consistency`; an unmapped answer is never consistent), and the share
    answered correctly in every order (`all_orders_correct`).
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("answer_type") == "choice":
            groups[str(record.get("base_id") or record["id"])].append(record)
    correct_all, consistent, n_pairs, n_correct = 0, 0, 0, 0
    for group in groups.values():
        hits = [
            extract_option_letter(str(r.get("prediction") or ""), r.get("options"))
            == reference_letter(str(r["reference"]), r.get("options"), f"record {r['id']}")
            for r in group
        ]
        picks = {chosen_option(r) for r in group}
        n_pairs += len(group)
        n_correct += sum(hits)
        correct_all += all(hits)
        consistent += len(picks) == 1 and None not in picks
    n_questions = len(groups)
    return {
        "n_questions": n_questions,
        "n_orders_total": n_pairs,
        "accuracy_all_orders": n_correct / n_pairs if n_pairs else 0.0,
        "consistency": consistent / n_questions if n_questions else 0.0,
        "all_orders_correct": correct_all / n_questions if n_questions else 0.0,
    }
