"""Metric functions: hand-computed values and invariants."""

from __future__ import annotations

import numpy as np
import pytest

from pallava.eval.metrics import accuracy, bootstrap_ci, confusion_matrix, precision_recall_f1, token_recall
from pallava.eval.report import zeroshot_report


def test_accuracy_is_the_mean_and_zero_when_empty() -> None:
    assert accuracy([True, False, True, True]) == 0.75
    assert accuracy([]) == 0.0


def test_token_recall_clips_counts_to_the_prediction() -> None:
    assert token_recall(["cell", "cell"], ["cell", "cell", "nucleus"]) == pytest.approx(2 / 3)
    assert token_recall(["cell"], ["cell", "cell"]) == 0.5
    assert token_recall(["a", "b", "c"], ["c", "a"]) == 1.0
    assert token_recall([], ["a"]) == 0.0
    assert token_recall(["a"], []) == 0.0


def test_confusion_matrix_rows_are_truth_and_columns_predictions() -> None:
    labels = ["aca", "n", "scc", "(unmapped)"]
    matrix = confusion_matrix(
        ["aca", "aca", "n", "scc", "scc"], ["aca", "scc", "n", "(unmapped)", "scc"], labels
    )
    expected = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == 5
    with pytest.raises(ValueError, match=r"y_pred\[0\] = 'x'"):
        confusion_matrix(["aca"], ["x"], labels)
    with pytest.raises(ValueError, match="2 true labels but 1"):
        confusion_matrix(["aca", "n"], ["aca"], labels)


def test_precision_recall_f1_by_hand() -> None:
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    result = precision_recall_f1(y_true, y_pred, ["a", "b", "c"])
    assert result["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert result["per_class"]["b"]["precision"] == 0.5 and result["per_class"]["b"]["recall"] == 0.5
    assert result["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert result["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # every prediction inside the labels: micro P = R = F1 = accuracy
    assert result["micro"]["f1"] == pytest.approx(4 / 6)
    assert result["micro"]["precision"] == pytest.approx(4 / 6)


def test_unmapped_predictions_lower_recall_but_are_not_false_positives() -> None:
    result = precision_recall_f1(["a", "a", "b", "b"], ["a", "?", "b", "?"], ["a", "b"])
    assert result["micro"]["precision"] == 1.0
    assert result["micro"]["recall"] == 0.5
    assert result["macro"]["recall"] == 0.5
    assert result["per_class"]["a"]["support"] == 2


def test_bootstrap_is_deterministic_and_contains_the_estimate() -> None:
    rng = np.random.default_rng(1)
    for n in (5, 40, 700):
        values = rng.random(n) < 0.7
        first = bootstrap_ci(values, n_resamples=500, seed=7)
        assert first == bootstrap_ci(values, n_resamples=500, seed=7)
        assert first != bootstrap_ci(values, n_resamples=500, seed=8) or n == 5
        low, high = first
        assert 0.0 <= low <= values.mean() <= high <= 1.0


def test_bootstrap_narrows_with_more_items_and_handles_edge_cases() -> None:
    small = bootstrap_ci([1, 0] * 10, seed=0)
    large = bootstrap_ci([1, 0] * 1000, seed=0)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert bootstrap_ci([]) is None
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1], alpha=1.5)


def test_bootstrap_accepts_a_custom_statistic() -> None:
    values = np.arange(100, dtype=float)
    low, high = bootstrap_ci(values, statistic=lambda resamples: np.median(resamples, axis=1), seed=0)
    assert low <= np.median(values) <= high


def test_macro_averages_over_classes_in_the_data_or_the_predictions() -> None:
    """A label map wider than the data (a three-organ model scored on one organ's images) must not pull the
    macro average towards 0 with classes that nobody has and nothing predicted; a class predicted
    without support still counts, with F1 0."""
    wide = ["a", "b", "c", "d"]
    result = precision_recall_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"], wide)
    f1_a, f1_b = 2 / 3, 0.8
    assert result["macro"]["f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert result["per_class"]["c"]["support"] == 0  # still listed
    false_positive = precision_recall_f1(["a", "a", "b", "b"], ["a", "c", "b", "b"], wide)
    assert false_positive["macro"]["f1"] == pytest.approx((f1_a + 1.0 + 0.0) / 3)
    report = zeroshot_report(["a", "a", "b", "b"] * 5, ["a", "b", "b", "b"] * 5, wide, n_resamples=200)
    assert report["macro"]["f1"] == pytest.approx((f1_a + f1_b) / 2)
    low, high = report["macro"]["f1_ci"]
    assert low <= report["macro"]["f1"] <= high
