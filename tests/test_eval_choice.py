"""Multiple-choice letter extraction and option-order consistency."""

from __future__ import annotations

import pytest

from pallava.eval.choice import (
    extract_option_letter,
    option_consistency,
    option_text,
    paper_option_letter,
    permute_options,
    reference_letter,
)
from pallava.eval.scorers import item_scores, score

OPTIONS = ["A:Liver", "B:Squamous cell carcinoma", "C:Carcinoma", "D:Bone marrow"]


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),
        ("B:", "B"),
        ("B: Squamous cell carcinoma", "B"),
        ("(B)", "B"),
        ("[B]", "B"),
        ("B.", "B"),
        ("B) Squamous cell carcinoma", "B"),
        ("b", "B"),
        ("(b)", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: (c)", "C"),
        ("I would choose option D because of the marrow.", "D"),
        ("The correct choice is A", "A"),
        ("Squamous cell carcinoma", "B"),  # the option's text; the longer text beats "Carcinoma"
        ("Squamous cell carcinoma, option B", "B"),  # the trained form: the name, then the letter
        ("Carcinoma, option B", "B"),  # name and letter disagree: the letter is the answer
        ("It is a carcinoma.", "C"),
        ("bone marrow", "D"),
        ("A tumour of the liver", "A"),  # not the article "A": found through the option text "liver"
        ("the answer is a tumour", None),  # lower-case "a" before a word is an article
        ("A tumour", None),
        ("E", None),  # not an option of a 4-option question
        ("", None),
        ("I am not sure", None),
        ("Both", None),
    ],
)
def test_extract_option_letter(prediction: str, letter: str | None) -> None:
    assert extract_option_letter(prediction, OPTIONS) == letter


def test_ambiguous_text_matches_are_wrong() -> None:
    options = ["A:left lung", "B:right lung"]
    assert extract_option_letter("left lung or right lung", options) is None
    assert extract_option_letter("E", None) is None
    assert extract_option_letter("D", None) == "D"


def test_option_text_and_reference_letter() -> None:
    assert option_text("A:Liver") == "Liver"
    assert option_text("(C) Skin") == "Skin"
    assert option_text("Liver") == "Liver"
    assert reference_letter("B", OPTIONS) == "B"
    assert reference_letter("(c)", OPTIONS) == "C"
    assert reference_letter("Bone marrow", OPTIONS) == "D"
    with pytest.raises(ValueError, match="record 7: 'kidney' is neither"):
        reference_letter("kidney", OPTIONS, "record 7")


def test_paper_rule_takes_the_text_before_the_first_colon() -> None:
    assert paper_option_letter("B:Squamous cell carcinoma") == "B"
    assert paper_option_letter(" C ") == "C"
    assert paper_option_letter("(B)") == "(B)"
    records = [
        {
            "id": str(i),
            "question": "?",
            "prediction": p,
            "reference": "B",
            "answer_type": "choice",
            "options": OPTIONS,
        }
        for i, p in enumerate(["B:x", "(B)", "The answer is B", "Squamous cell carcinoma", "A"])
    ]
    assert [s.correct for s in item_scores(records, "paper")] == [True, False, False, False, False]
    assert [s.correct for s in item_scores(records, "strict")] == [True, True, True, True, False]


def test_permute_options_keeps_the_right_answer_under_its_letter() -> None:
    orders = permute_options(OPTIONS, "B", n_orders=4, seed=0)
    assert len(orders) == 4
    assert orders[0][0] == [option_text(o) for o in OPTIONS] and orders[0][1] == "B"
    assert len({tuple(order) for order, _ in orders}) == 4
    for order, letter in orders:
        assert sorted(order) == sorted(option_text(o) for o in OPTIONS)
        assert order["ABCD".index(letter)] == "Squamous cell carcinoma"
    assert permute_options(OPTIONS, "B", 4, seed=0) == orders
    assert len(permute_options(["A:x", "B:y"], "A", n_orders=5)) == 2


def _copies(pick: str) -> list[dict]:
    """Four orders of one question; `pick` says whether the model follows the text or the position."""
    records = []
    for k, (order, letter) in enumerate(permute_options(OPTIONS, "B", 4, seed=1)):
        answer = "Squamous cell carcinoma" if pick == "text" else "A"
        records.append(
            {
                "id": f"q~p{k}" if k else "q",
                "base_id": "q",
                "question": "?",
                "prediction": answer,
                "reference": letter,
                "answer_type": "choice",
                "options": order,
            }
        )
    return records


def test_option_consistency_separates_content_from_position() -> None:
    by_text = option_consistency(_copies("text"))
    assert by_text == {
        "n_questions": 1,
        "n_orders_total": 4,
        "accuracy_all_orders": 1.0,
        "consistency": 1.0,
        "all_orders_correct": 1.0,
    }
    by_position = option_consistency(_copies("position"))
    assert by_position["consistency"] == 0.0 and by_position["all_orders_correct"] == 0.0
    assert 0.0 <= by_position["accuracy_all_orders"] < 1.0


def test_score_reports_original_order_and_permutations_separately() -> None:
    summary = score(_copies("text"), "strict", ci=False)
    assert summary["choice"]["n"] == 1
    assert summary["n"] == 1
    assert summary["choice_orders"]["n_orders_total"] == 4
