"""Linear probe of a PLIP's image features: how much of each dataset's classes its frozen features hold.

The encoder-evaluation protocol of pathology foundation models beside zero-shot classification: a logistic
regression on standardised frozen features, fitted on one split and scored on another. The regularisation
strength is chosen by cross-validation on the fitting split alone (folds that keep a near-duplicate cluster
together where the manifest names clusters), so the scored split never tunes anything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from pallava.data.records import LabelledImage
from pallava.eval.metrics import bootstrap_ci
from pallava.models.plip.zeroshot import PlipZeroShot
from pallava.train.plip_eval import classification_metrics

PROBE_FEATURES = ("embedding", "tower")
PROBE_STRENGTHS = (0.001, 0.01, 0.1, 1.0, 10.0)  # C, the inverse L2 strength, tried by cross-validation
PROBE_FOLDS = 5


def probe_features(
    zs: PlipZeroShot, images: Sequence[str], features: str = "embedding", batch_size: int = 64
) -> np.ndarray:
    """(N, D) frozen features: PLIP's normalised image embedding, or `tower`, the mean of the vision tower's
    post-normed last-layer patch tokens (what the assistant's connector reads)."""
    if features not in PROBE_FEATURES:
        raise ValueError(f"unknown probe features {features!r}; expected one of {', '.join(PROBE_FEATURES)}")
    if features == "embedding":
        return zs.encode_images(images, batch_size, progress=True).numpy()
    tokens = zs.encode_image_tokens(images, batch_size, progress=True)
    return tokens[:, 1:].mean(dim=1).numpy()


def few_shots(items: Sequence[LabelledImage], shots: int | None, seed: int = 0) -> list[LabelledImage]:
    """`shots` items of each class drawn with a seed (all of a class that has fewer), or all items."""
    if shots is None:
        return list(items)
    if shots < 1:
        raise ValueError(f"--shots must be at least 1, got {shots}")
    rng = random.Random(seed)
    by_label: dict[str, list[LabelledImage]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    return [
        item
        for label in sorted(by_label)
        for item in rng.sample(by_label[label], min(shots, len(by_label[label])))
    ]


def cluster_groups(items: Sequence[LabelledImage]) -> list[str] | None:
    """The items' near-duplicate clusters, to keep each in one cross-validation fold; None unless every item
    names one."""
    clusters = [item.cluster for item in items]
    return clusters if all(clusters) else None


def fit_probe(
    features: np.ndarray, labels: Sequence[str], groups: Sequence[str] | None = None, seed: int = 0
):
    """A fitted StandardScaler + LogisticRegression pipeline and its search record: C from
    `PROBE_STRENGTHS` by stratified cross-validation (grouped by `groups` when each class has enough of
    them); with under two items in some class there is nothing to validate on, and C is 1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least two classes to fit on, got {classes}")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    fewest = min(list(labels).count(label) for label in classes)
    if groups is not None:  # folds by cluster need enough clusters in every class
        fewest_groups = min(len({g for g, y in zip(groups, labels, strict=True) if y == c}) for c in classes)
        groups = groups if fewest_groups >= 2 else None
        fewest = min(fewest, fewest_groups) if groups is not None else fewest
    folds = min(PROBE_FOLDS, fewest)
    if folds < 2:
        pipeline.set_params(logisticregression__C=1.0).fit(features, list(labels))
        return pipeline, {"C": 1.0, "folds": 0, "grouped": False, "cv_accuracy": None}
    splitter = (
        StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        if groups is not None
        else StratifiedKFold(folds, shuffle=True, random_state=seed)
    )
    search = GridSearchCV(pipeline, {"logisticregression__C": list(PROBE_STRENGTHS)}, cv=splitter)
    search.fit(features, list(labels), groups=groups)
    return search.best_estimator_, {
        "C": float(search.best_params_["logisticregression__C"]),
        "folds": folds,
        "grouped": groups is not None,
        "cv_accuracy": round(float(search.best_score_), 4),
    }


def probe_report(
    zs: PlipZeroShot,
    fit_items: Sequence[LabelledImage],
    eval_items: Sequence[LabelledImage],
    features: str = "embedding",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Fit a probe on `fit_items`' features, score it on `eval_items`: (report, per-image predictions)."""
    if not fit_items or not eval_items:
        raise ValueError(
            f"a linear probe needs images to fit on and to score: got {len(fit_items)} and {len(eval_items)}"
        )
    unseen = sorted({item.label for item in eval_items} - {item.label for item in fit_items})
    if unseen:
        raise ValueError(f"classes {unseen} are scored but have no image to fit the probe on")
    fitted, search = fit_probe(
        probe_features(zs, [item.path for item in fit_items], features, batch_size),
        [item.label for item in fit_items],
        cluster_groups(fit_items),
        seed,
    )
    eval_x = probe_features(zs, [item.path for item in eval_items], features, batch_size)
    proba = fitted.predict_proba(eval_x)
    classes = [str(c) for c in fitted.classes_]
    predicted = [classes[i] for i in proba.argmax(axis=1)]
    truth = [item.label for item in eval_items]
    report = classification_metrics(truth, predicted, classes)
    correct = [t == p for t, p in zip(truth, predicted, strict=True)]
    # the best a constant answer can do on the scored split: what the probe's accuracy is to be read against
    majority = max(classes, key=truth.count)
    report.update(
        class_names=classes,
        features=features,
        fit_images=len(fit_items),
        accuracy_ci=bootstrap_ci(correct, seed=seed),
        majority_class=majority,
        majority_accuracy=float(np.mean([t == majority for t in truth])),
        search=search,
    )
    rows = [
        {"image": item.path, "label": item.label, "predicted": p, "proba": [round(float(x), 6) for x in row]}
        for item, p, row in zip(eval_items, predicted, proba, strict=True)
    ]
    return report, rows


def probe_summary(reports: dict[str, dict[str, object]]) -> str:
    """A Markdown table of per-dataset probe reports."""
    lines = [
        "| dataset | features | fit images | scored images | accuracy % [95% CI] | macro F1 % "
        "| majority class % | C (cross-validated) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, report in reports.items():
        low, high = report["accuracy_ci"]
        lines.append(
            f"| {name} | {report['features']} | {report['fit_images']} | {report['n']} | "
            f"{100 * report['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | "
            f"{100 * report['macro_f1']:.1f} | {100 * report['majority_accuracy']:.1f} | "
            f"{report['search']['C']:g} |"
        )
    return "\n".join(lines) + "\n"
