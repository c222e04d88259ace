"""Pure metric functions: accuracy, token recall, confusion matrix, precision/recall/F1, bootstrap CIs.

No model or file I/O here, so every number in a report can be recomputed from the
predictions file alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np


def accuracy(correct: Sequence[bool | float]) -> float:
    """Mean of per-item correctness; 0.0 for an empty list (nothing was answered correctly)."""
    if len(correct) == 0:
        return 0.0
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def token_recall(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Share of reference tokens found in the prediction, each counted at most as often as
    it occurs in the prediction: sum_t min(pred[t], ref[t]) / len(reference).

    Over any tokens: PA-LLaVA's open-set recall counts the language model's token ids (BPE pieces),
    the `strict` scorer whitespace words. An empty reference gives 0.0 (nothing to recall).
    """
    if not reference_tokens:
        return 0.0
    predicted = Counter(prediction_tokens)
    reference = Counter(reference_tokens)
    hits = sum(min(predicted[token], count) for token, count in reference.items())
    return hits / len(reference_tokens)


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts (len(labels), len(labels)): row = true label, column = predicted label.

    Every true and predicted value must be one of `labels`; callers that allow unmapped
    answers add an explicit label for them so that no item disappears from the matrix.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"confusion_matrix: {len(y_true)} true labels but {len(y_pred)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"confusion_matrix: labels contain duplicates: {list(labels)}")
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for position, (true, pred) in enumerate(zip(y_true, y_pred, strict=True)):
        for name, value in (("y_true", true), ("y_pred", pred)):
            if value not in index:
                raise ValueError(
                    f"confusion_matrix: {name}[{position}] = {value!r} is not one of {list(labels)}"
                )
        matrix[index[true], index[pred]] += 1
    return matrix


def _prf(tp: float, fp: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def precision_recall_f1(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, object]:
    """Per-class, micro and macro precision/recall/F1 over `labels`.

    A prediction outside `labels` (an unmapped answer) is a miss for its true class and a
    false positive for no class, so it lowers recall and micro F1 but is never dropped.
    Macro averages weight equally every class of `labels` that is in the data or among the predictions (a
    class predicted without support counts, with F1 0; one nobody has and nothing predicted is left out,
    so a label map wider than the data does not pull the average towards 0); undefined ratios count as 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"precision_recall_f1: {len(y_true)} true labels but {len(y_pred)} predictions")
    pairs = list(zip(y_true, y_pred, strict=True))
    per_class: dict[str, dict[str, float]] = {}
    seen: list[str] = []  # the classes in the data or among the predictions: the macro average's
    totals = {"tp": 0, "fp": 0, "fn": 0}
    for label in labels:
        tp = sum(1 for t, p in pairs if t == label and p == label)
        fp = sum(1 for t, p in pairs if t != label and p == label)
        fn = sum(1 for t, p in pairs if t == label and p != label)
        per_class[label] = {**_prf(tp, fp, fn), "support": tp + fn}
        if tp + fp + fn:
            seen.append(label)
        totals["tp"] += tp
        totals["fp"] += fp
        totals["fn"] += fn
    macro = {
        name: float(np.mean([per_class[label][name] for label in seen])) if seen else 0.0
        for name in ("precision", "recall", "f1")
    }
    return {"per_class": per_class, "micro": _prf(totals["tp"], totals["fp"], totals["fn"]), "macro": macro}


def bootstrap_ci(
    values: Sequence[float | bool],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float] | None:
    """Percentile bootstrap (1 - alpha) interval of a statistic of per-item values.

    `statistic` maps an (R, n) array of resamples to R numbers (default: the row mean).
    Deterministic for a given seed; None for an empty list (no interval exists).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    reduce = statistic or (lambda resamples: resamples.mean(axis=1))
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // data.size)  # bound memory at ~16 MB of indices per chunk
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        indices = rng.integers(0, data.size, size=(stop - start, data.size))
        estimates[start:stop] = reduce(data[indices])
    low, high = np.quantile(estimates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
