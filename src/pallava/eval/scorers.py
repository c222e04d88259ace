"""The three VQA scorers: `strict` (ours), `paper` (PA-LLaVA) and `llava-med` (legacy).

A prediction record is `{id, question, prediction, reference, answer_type: closed|open|choice,
options?}`. Each scorer first turns records into per-item `ItemScore`s (pure, one rule per
scorer) and then summarises them: per-type accuracy (and open recall), `n` per type, and
95% bootstrap intervals. Every item counts in its denominator, except under the labelled
`llava-med` closed-set rule, which reproduces that scorer's flaw on purpose.

Open recall is counted in a named unit (`recall_unit` in the summary): whitespace words for
`strict`, word types for `llava-med`, and for `paper` the language model's tokens, as the
authors count them, when a `tokenize` function (the model's tokenizer) is given; without one the
`paper` scorer falls back to words and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pallava.eval.choice import (
    extract_option_letter,
    option_consistency,
    paper_option_letter,
    reference_letter,
)
from pallava.eval.metrics import accuracy, bootstrap_ci, token_recall
from pallava.eval.normalize import first_yes_no, normalize_llava_med, normalize_paper, normalize_strict

ANSWER_TYPES = ("closed", "open", "choice")
Tokenize = Callable[[str], Sequence[int]]  # text -> the language model's token ids (no special tokens)
RECALL_UNITS = {"strict": "words", "paper": "words", "llava-med": "word types (LLaVA-Med)"}
LLM_TOKENS = "llm tokens"
PAPER_WORDS_NOTE = (
    "counted over whitespace words: the paper counts the language model's tokens; give the model's "
    "tokenizer (`pallava eval score --model DIR`) for the paper's recall"
)
LLAVA_MED_FLAW = (
    "legacy LLaVA-Med closed-set rule, reproduced for comparison only: a prediction containing "
    "'yes' or 'no' anywhere (even inside 'normal', 'not', 'nodule') is a hit when it contains the "
    "reference, and is DROPPED from the denominator when it does not; predictions with neither "
    "count as wrong. Not comparable with strict or paper scores."
)


@dataclass(frozen=True)
class ItemScore:
    """One record's outcome: `correct` is None only when the legacy rule drops the item."""

    id: str
    answer_type: str
    correct: bool | None
    recall: float | None = None


def _field(record: Mapping[str, Any], name: str, index: int) -> str:
    if name not in record:
        raise ValueError(f"prediction record {record.get('id', index)}: missing field '{name}'")
    value = record[name]
    return "" if value is None else str(value)


def _answer_type(record: Mapping[str, Any], index: int) -> str:
    answer_type = _field(record, "answer_type", index).lower()
    if answer_type not in ANSWER_TYPES:
        raise ValueError(
            f"prediction record {record.get('id', index)}: field 'answer_type' must be one of "
            f"{ANSWER_TYPES}, got {answer_type!r}"
        )
    return answer_type


def _choice_hit(record: Mapping[str, Any], index: int, paper_rule: bool) -> bool:
    options = record.get("options")
    where = f"prediction record {record.get('id', index)}: field 'reference'"
    wanted = reference_letter(_field(record, "reference", index), options, where)
    prediction = _field(record, "prediction", index)
    if paper_rule:  # the authors lower-case both sides
        return paper_option_letter(prediction).lower() == wanted.lower()
    return extract_option_letter(prediction, options) == wanted


def paper_item(record: Mapping[str, Any], index: int = 0, tokenize: Tokenize | None = None) -> ItemScore:
    """PA-LLaVA: normalise both sides, exact match; closed means the reference is yes/no; open also
    gets recall over the language model's tokens of the normalised texts (`tokenize`; whitespace words
    without it); choice compares the text before the first ':' with the letter."""
    record_id = str(record.get("id", index))
    if _answer_type(record, index) == "choice":
        return ItemScore(record_id, "choice", _choice_hit(record, index, paper_rule=True))
    prediction = normalize_paper(_field(record, "prediction", index))
    reference = normalize_paper(_field(record, "reference", index))
    if reference in ("yes", "no"):
        return ItemScore(record_id, "closed", prediction == reference)
    if tokenize is not None:  # the authors' recall: BPE ids of the normalised answers
        recall = token_recall(tokenize(prediction), tokenize(reference))
    else:
        recall = token_recall(prediction.split(), reference.split())
    return ItemScore(record_id, "open", prediction == reference, recall)


def strict_item(record: Mapping[str, Any], index: int = 0) -> ItemScore:
    """Ours: closed = the first whole yes/no word of the answer equals the reference; open =
    exact match after normalisation (plus recall over whitespace words); choice = robust letter extraction."""
    record_id = str(record.get("id", index))
    answer_type = _answer_type(record, index)
    if answer_type == "choice":
        return ItemScore(record_id, "choice", _choice_hit(record, index, paper_rule=False))
    prediction = normalize_strict(_field(record, "prediction", index))
    reference = normalize_strict(_field(record, "reference", index))
    if answer_type == "closed":
        expected = first_yes_no(reference)
        if expected is None:  # a closed set other than yes/no ("left"/"right"): exact match
            return ItemScore(record_id, "closed", bool(reference) and prediction == reference)
        return ItemScore(record_id, "closed", first_yes_no(prediction) == expected)
    recall = token_recall(prediction.split(), reference.split())
    return ItemScore(record_id, "open", bool(reference) and prediction == reference, recall)


def llava_med_recall(prediction: str, reference: str) -> float:
    """LLaVA-Med's open "recall": tp / (tp + fn) over word types, where tp adds the
    prediction's count of each shared word (so repeats in the prediction count again)."""
    predicted, expected = {}, {}
    for word in prediction.split():
        predicted[word] = predicted.get(word, 0) + 1
    for word in reference.split():
        expected[word] = expected.get(word, 0) + 1
    if not predicted or not expected:
        return 0.0
    tp = sum(count for word, count in predicted.items() if word in expected)
    fn = sum(count for word, count in expected.items() if word not in predicted)
    return tp / (tp + fn) if tp else 0.0


def llava_med_item(record: Mapping[str, Any], index: int = 0) -> ItemScore:
    """LLaVA-Med: VQA-v2 normalisation; open = word-level recall (and exact match); closed =
    the legacy substring rule (see LLAVA_MED_FLAW); choice = robust letter extraction."""
    record_id = str(record.get("id", index))
    answer_type = _answer_type(record, index)
    if answer_type == "choice":
        return ItemScore(record_id, "choice", _choice_hit(record, index, paper_rule=False))
    prediction = normalize_llava_med(_field(record, "prediction", index).lower())
    reference = normalize_llava_med(_field(record, "reference", index).lower())
    if answer_type == "open":
        return ItemScore(record_id, "open", prediction == reference, llava_med_recall(prediction, reference))
    if "yes" in prediction or "no" in prediction:
        return ItemScore(record_id, "closed", True if reference in prediction else None)
    return ItemScore(record_id, "closed", False)


SCORERS: dict[str, Callable[[Mapping[str, Any], int], ItemScore]] = {
    "strict": strict_item,
    "paper": paper_item,
    "llava-med": llava_med_item,
}


def item_scores(
    records: Iterable[Mapping[str, Any]], scorer: str = "strict", tokenize: Tokenize | None = None
) -> list[ItemScore]:
    """Per-item outcomes of one scorer, in record order (`tokenize` is used by `paper` only)."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    score = partial(paper_item, tokenize=tokenize) if scorer == "paper" else SCORERS[scorer]
    return [score(record, index) for index, record in enumerate(records)]


def recall_unit(scorer: str, tokenize: Tokenize | None = None) -> str:
    """What a scorer's open recall counts."""
    return LLM_TOKENS if scorer == "paper" and tokenize is not None else RECALL_UNITS[scorer]


def _interval(values: Sequence[float], ci: bool, n_resamples: int, seed: int) -> list[float] | None:
    if not ci:
        return None
    bounds = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return None if bounds is None else [bounds[0], bounds[1]]


def summarize(
    scores: Sequence[ItemScore],
    scorer: str,
    ci: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    unit: str | None = None,
) -> dict[str, Any]:
    """Per-type and overall accuracy, open recall (in `unit`), `n` and 95% bootstrap intervals."""
    summary: dict[str, Any] = {"scorer": scorer, "n": len(scores)}
    if scorer == "llava-med":
        summary["legacy"] = True
    kept = [s for s in scores if s.correct is not None]
    for answer_type in ANSWER_TYPES:
        typed = [s for s in scores if s.answer_type == answer_type]
        if not typed:
            continue
        hits = [float(bool(s.correct)) for s in typed if s.correct is not None]
        block: dict[str, Any] = {"n": len(typed), "accuracy": accuracy(hits)}
        block["accuracy_ci"] = _interval(hits, ci, n_resamples, seed)
        if answer_type == "open":
            recalls = [s.recall or 0.0 for s in typed]
            block["recall"] = accuracy(recalls)
            block["recall_ci"] = _interval(recalls, ci, n_resamples, seed)
            block["recall_unit"] = unit or RECALL_UNITS[scorer]
            if scorer == "paper" and block["recall_unit"] != LLM_TOKENS:
                block["recall_note"] = PAPER_WORDS_NOTE
        if len(hits) != len(typed):
            block.update(
                n_scored=len(hits),
                n_dropped=len(typed) - len(hits),
                accuracy_all_items=sum(hits) / len(typed),
                flaw=LLAVA_MED_FLAW,
            )
        summary[answer_type] = block
    overall = [float(bool(s.correct)) for s in kept]
    summary["overall"] = {
        "n": len(kept),
        "accuracy": accuracy(overall),
        "accuracy_ci": _interval(overall, ci, n_resamples, seed),
    }
    return summary


def score(
    records: Sequence[Mapping[str, Any]],
    scorer: str = "strict",
    ci: bool = True,
    n_resamples: int = 1000,
    seed: int = 0,
    tokenize: Tokenize | None = None,
) -> dict[str, Any]:
    """Score prediction records with the named scorer (`tokenize`: the model's tokenizer, for the
    `paper` scorer's open recall over language-model tokens).

    Permuted copies of choice questions (records whose `base_id` differs from their `id`)
    are left out of the per-type numbers and summarised under `choice_orders` instead.
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
    primary = [r for r in records if not is_permuted_copy(r)]
    summary = summarize(
        item_scores(primary, scorer, tokenize), scorer, ci, n_resamples, seed, recall_unit(scorer, tokenize)
    )
    if len(primary) != len(records):
        summary["choice_orders"] = option_consistency(records)
    return summary


def is_permuted_copy(record: Mapping[str, Any]) -> bool:
    """True for a re-ordered copy of a choice question (the original keeps `base_id == id`)."""
    base_id = record.get("base_id")
    return base_id is not None and str(base_id) != str(record.get("id"))


def score_strict(records: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """Our default scorer: nothing is ever dropped from a denominator (see `strict_item`)."""
    return score(records, "strict", **kwargs)


def score_paper(records: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """PA-LLaVA's published scoring (see `paper_item`)."""
    return score(records, "paper", **kwargs)


def score_llava_med(records: Sequence[Mapping[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """LLaVA-Med's published scoring with its closed-set flaw, labelled `legacy` (see `llava_med_item`)."""
    return score(records, "llava-med", **kwargs)
