"""Scorers on hand-made traps and on the real PathVQA answers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pallava.cli import main
from pallava.eval.normalize import first_yes_no, normalize_llava_med, normalize_paper, normalize_strict
from pallava.eval.runner import model_tokenize
from pallava.eval.scorers import (
    LLAVA_MED_FLAW,
    item_scores,
    llava_med_recall,
    score,
    score_llava_med,
    score_paper,
    score_strict,
)
from pallava.processing.tokenizer import build_tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCORER_NAMES = ("strict", "paper", "llava-med")


def rec(prediction: str, reference: str, answer_type: str = "closed", **extra: object) -> dict:
    return {
        "id": extra.pop("id", "q"),
        "question": "?",
        "prediction": prediction,
        "reference": reference,
        "answer_type": answer_type,
        **extra,
    }


def correct(scorer: str, prediction: str, reference: str, answer_type: str = "closed") -> bool | None:
    return item_scores([rec(prediction, reference, answer_type)], scorer)[0].correct


@pytest.fixture(scope="module")
def pathvqa_records() -> list[dict]:
    path = SHARED_DATA / "pathvqa-text" / "pvqa_test.json"
    if not path.is_file():
        pytest.skip(f"shared PathVQA text not found at {path}")
    records = []
    for image in json.loads(path.read_text()):
        pairs = zip(image["sentf"]["pvqa"], image["labelf"]["pvqa"], strict=True)
        for index, (question, label) in enumerate(pairs):
            answer = next(iter(label))
            closed = answer.strip().lower() in ("yes", "no")
            records.append(
                rec(
                    answer,
                    answer,
                    "closed" if closed else "open",
                    id=f"{image['img_id']}_{index}",
                    question=question,
                )
            )
    return records


# --- normalisation -------------------------------------------------------------------------


def test_paper_normalisation_follows_the_published_rules() -> None:
    assert normalize_paper("X-Ray of the (Chest)!") == "xray of the chest"
    assert normalize_paper("x ray") == "xray"
    assert normalize_paper("well - differentiated") == "well-differentiated"
    assert normalize_paper("No.") == "no"
    assert normalize_paper("'yes'; ~#*:?") == "yes"
    assert normalize_paper("-- no --") == "-- no --"  # hyphens are not in the paper's list


def test_strict_normalisation_also_trims_edge_punctuation_and_spaces() -> None:
    assert normalize_strict("-- no --") == "no"
    assert normalize_strict("  squamous   cell\tcarcinoma. ") == "squamous cell carcinoma"
    assert normalize_strict("well-differentiated") == "well-differentiated"


def test_llava_med_normalisation_drops_articles_and_maps_number_words() -> None:
    assert normalize_llava_med("The two nipples") == "2 nipples"
    assert normalize_llava_med("an axon, a cell") == "axon cell"
    assert normalize_llava_med("spindle-shaped") == "spindle shaped"
    assert normalize_llava_med("bone, calvarium") == "bone calvarium"
    assert normalize_llava_med("none") == "0"


def test_first_yes_no_reads_whole_words_only() -> None:
    assert first_yes_no("no") == "no"
    assert first_yes_no("normal") is None
    assert first_yes_no("not present") is None
    assert first_yes_no("nodule") is None
    assert first_yes_no("no, yes") == "no"
    assert first_yes_no("the answer is yes") == "yes"
    assert first_yes_no("") is None


# --- closed-set traps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "strict", "paper", "llava_med"),
    [
        ("no", "no", True, True, True),
        ("No.", "no", True, True, True),
        ("no.", "no", True, True, True),
        ("NO", "no", True, True, True),
        ("normal", "no", False, False, True),  # legacy: "no" is a substring of "normal"
        ("not", "no", False, False, True),  # legacy: "no" is a substring of "not"
        ("not present", "no", False, False, True),
        ("Yes, it is.", "yes", True, False, True),
        ("The answer is yes", "yes", True, False, True),
        ("...yes!", "yes", True, True, True),
        ("-- no --", "no", True, False, True),
        ("no, yes", "yes", False, False, True),  # strict reads the first yes/no word
        ("yes", "no", False, False, None),  # legacy drops a wrong yes/no answer
        ("no", "yes", False, False, None),
        ("", "yes", False, False, False),
        ("maybe", "no", False, False, False),
    ],
)
def test_closed_set_traps(
    prediction: str, reference: str, strict: bool, paper: bool, llava_med: bool | None
) -> None:
    assert correct("strict", prediction, reference) is strict
    assert correct("paper", prediction, reference) is paper
    assert correct("llava-med", prediction, reference) is llava_med


def test_strict_closed_set_other_than_yes_no_uses_exact_match() -> None:
    assert correct("strict", "Left.", "left") is True
    assert correct("strict", "right", "left") is False


def test_paper_decides_closed_by_the_reference_not_the_record_type() -> None:
    scores = item_scores([rec("yes", "yes", "open"), rec("liver", "liver", "closed")], "paper")
    assert [s.answer_type for s in scores] == ["closed", "open"]


def test_paper_choice_rule_lower_cases_both_sides() -> None:
    # The authors lower-case the text before the first ":" and the reference letter before comparing.
    options = ["Liver", "Lung", "Skin", "Bone"]
    records = [
        rec(p, r, "choice", options=options, id=str(i))
        for i, (p, r) in enumerate([("b:lung", "B"), ("B:Lung", "b"), ("b", "B"), ("a:liver", "B")])
    ]
    assert [s.correct for s in item_scores(records, "paper")] == [True, True, True, False]


# --- open-set traps ------------------------------------------------------------------------


def test_open_exact_match_and_recall() -> None:
    records = [
        rec("X-ray", "x ray", "open", id="a"),
        rec("the liver", "liver", "open", id="b"),
        rec("liver", "the liver", "open", id="c"),
        rec("", "liver", "open", id="d"),
        rec("two", "2", "open", id="e"),
        rec("squamous cell carcinoma.", "squamous cell carcinoma", "open", id="f"),
    ]
    strict = item_scores(records, "strict")
    assert [s.correct for s in strict] == [True, False, False, False, False, True]
    assert [s.recall for s in strict] == [1.0, 1.0, 0.5, 0.0, 0.0, 1.0]
    paper = item_scores(records, "paper")
    assert [s.correct for s in paper] == [True, False, False, False, False, True]
    legacy = item_scores(records, "llava-med")
    assert [s.correct for s in legacy] == [True, True, True, False, True, True]  # both sides become "x ray"
    assert [s.recall for s in legacy] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert item_scores([rec("xray", "x-ray", "open")], "llava-med")[0].correct is False


def test_paper_open_recall_counts_the_model_tokenizers_tokens(tmp_path: Path, capsys) -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)  # a model folder's tokenizer files
    records = [
        rec("the liver", "liver", "open", id="a"),
        rec("Squamous cell carcinoma!", "squamous cell carcinoma", "open", id="b"),
        rec("cell carcinoma", "squamous cell carcinoma", "open", id="c"),
    ]

    def authors(prediction: str, reference: str) -> float:  # their recall: BPE ids of the normalised answers
        predicted = Counter(tokenizer.encode(normalize_paper(prediction), add_special_tokens=False))
        expected = Counter(tokenizer.encode(normalize_paper(reference), add_special_tokens=False))
        return sum(min(predicted[t], n) for t, n in expected.items()) / sum(expected.values())

    wanted = [authors(r["prediction"], r["reference"]) for r in records]
    tokenize = model_tokenize(tmp_path)
    assert [s.recall for s in item_scores(records, "paper", tokenize)] == pytest.approx(wanted)
    assert (
        wanted[0] == 0.0 and item_scores(records, "paper")[0].recall == 1.0
    )  # "liver" vs " liver": other ids
    tokens = score(records, "paper", ci=False, tokenize=tokenize)["open"]
    assert tokens["recall_unit"] == "llm tokens" and tokens["recall"] == pytest.approx(sum(wanted) / 3)
    assert "recall_note" not in tokens
    words = score(records, "paper", ci=False)["open"]
    assert words["recall_unit"] == "words" and "tokenizer" in words["recall_note"]
    assert score(records, "strict", ci=False, tokenize=tokenize)["open"]["recall_unit"] == "words"
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        main(
            [
                "eval",
                "score",
                "--predictions",
                str(predictions),
                "--scorer",
                "paper",
                "--model",
                str(tmp_path),
                "--no-ci",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["open"]["recall"] == pytest.approx(sum(wanted) / 3)


def test_llava_med_recall_counts_repeated_prediction_words() -> None:
    assert llava_med_recall("cell cell", "cell") == 1.0
    assert llava_med_recall("cell", "cell nucleus") == 0.5
    assert llava_med_recall("a a a", "a b") == 0.75  # tp counts the prediction's repeats
    assert llava_med_recall("", "cell") == 0.0


# --- summaries and denominators ------------------------------------------------------------

TRAPS = [
    rec("normal", "no", id="1"),
    rec("not", "no", id="2"),
    rec("yes", "no", id="3"),
    rec("No.", "no", id="4"),
    rec("", "yes", id="5"),
    rec("liver", "liver", "open", id="6"),
    rec("", "lung", "open", id="7"),
    rec("B", "A", "choice", options=["A:liver", "B:lung", "C:skin", "D:bone"], id="8"),
]


@pytest.mark.parametrize("scorer", ["strict", "paper"])
def test_denominators_equal_item_counts(scorer: str) -> None:
    summary = score(TRAPS, scorer, ci=False)
    assert summary["n"] == len(TRAPS)
    assert sum(summary[t]["n"] for t in ("closed", "open", "choice")) == len(TRAPS)
    assert summary["closed"]["n"] == 5 and summary["open"]["n"] == 2 and summary["choice"]["n"] == 1
    assert summary["overall"]["n"] == len(TRAPS)
    assert summary["closed"]["accuracy"] == pytest.approx(1 / 5)
    assert "n_dropped" not in summary["closed"]


def test_llava_med_labels_its_dropped_denominator() -> None:
    summary = score_llava_med(TRAPS, ci=False)
    closed = summary["closed"]
    assert summary["legacy"] is True and closed["flaw"] == LLAVA_MED_FLAW
    assert closed["n"] == 5 and closed["n_scored"] == 4 and closed["n_dropped"] == 1
    assert closed["accuracy"] == pytest.approx(3 / 4)  # normal, not, No. are hits; "" is a miss
    assert closed["accuracy_all_items"] == pytest.approx(3 / 5)


def test_summary_intervals_contain_the_estimates() -> None:
    summary = score_strict(TRAPS * 10, seed=3)
    for block in (summary["closed"], summary["open"], summary["overall"]):
        low, high = block["accuracy_ci"]
        assert low <= block["accuracy"] <= high
    low, high = summary["open"]["recall_ci"]
    assert low <= summary["open"]["recall"] <= high
    assert score_strict(TRAPS * 10, seed=3) == summary


def test_bad_records_name_the_record_and_field() -> None:
    with pytest.raises(ValueError, match="record x: field 'answer_type'"):
        score([rec("a", "b", "yesno", id="x")], "strict")
    with pytest.raises(ValueError, match="record y: missing field 'reference'"):
        score([{"id": "y", "prediction": "a", "answer_type": "open"}], "paper")
    with pytest.raises(ValueError, match="unknown scorer"):
        score([], "bleu")


# --- real PathVQA answers ------------------------------------------------------------------


def test_pathvqa_references_score_perfectly_against_themselves(pathvqa_records: list[dict]) -> None:
    closed = sum(r["answer_type"] == "closed" for r in pathvqa_records)
    assert len(pathvqa_records) == 6761
    assert 0.45 < closed / len(pathvqa_records) < 0.55
    shouted = [{**r, "prediction": r["reference"].upper() + "."} for r in pathvqa_records]
    for scorer in SCORER_NAMES:
        for records in (pathvqa_records, shouted):
            summary = score(records, scorer, ci=False)
            assert summary["n"] == len(pathvqa_records)
            assert summary["closed"]["accuracy"] == 1.0, scorer
            assert summary["open"]["accuracy"] == 1.0, scorer
            assert summary["open"]["recall"] == 1.0, scorer


def test_always_yes_exposes_the_legacy_flaw_on_pathvqa(pathvqa_records: list[dict]) -> None:
    closed = [r for r in pathvqa_records if r["answer_type"] == "closed"]
    yes_share = sum(r["reference"].lower() == "yes" for r in closed) / len(closed)
    always_yes = [{**r, "prediction": "Yes"} for r in closed]
    assert score_strict(always_yes, ci=False)["closed"]["accuracy"] == pytest.approx(yes_share)
    assert score_paper(always_yes, ci=False)["closed"]["accuracy"] == pytest.approx(yes_share)
    legacy = score_llava_med(always_yes, ci=False)["closed"]
    assert legacy["accuracy"] == 1.0  # every wrong answer left the denominator
    assert legacy["n_dropped"] == len(closed) - round(yes_share * len(closed))
    assert legacy["accuracy_all_items"] == pytest.approx(yes_share)
