"""PLIP evaluation reports: zero-shot classification and image-text retrieval, with their plots."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pallava.data.labels import LabelMap
from pallava.eval.metrics import accuracy, confusion_matrix, precision_recall_f1
from pallava.models.plip.losses import positive_mask
from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES, caption_for
from pallava.models.plip.zeroshot import PlipZeroShot, classify_images, recall_at_k
from pallava.train.plip_data import PlipSample


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, object]:
    """Accuracy, macro/micro F1, per-class precision/recall/F1 and the confusion matrix (rows = truth)."""
    scores = precision_recall_f1(y_true, y_pred, labels)
    return {
        "n": len(y_true),
        "accuracy": accuracy([t == p for t, p in zip(y_true, y_pred, strict=True)]),
        "macro_f1": scores["macro"]["f1"],
        "micro_f1": scores["micro"]["f1"],
        "per_class": scores["per_class"],
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels).tolist(),
    }


def zeroshot_report(
    zs: PlipZeroShot,
    samples: Sequence[PlipSample],
    label_map: LabelMap,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
    batch_size: int = 64,
    head: str = "contrastive",
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Zero-shot classification of labelled samples by PLIP's contrastive or matching head: (report,
    per-image predictions)."""
    images = [s.image for s in samples]
    predicted, proba = classify_images(zs, images, label_map, templates, head, batch_size, progress=True)
    truth = [s.label for s in samples]
    report = classification_metrics(truth, predicted, label_map.labels())
    report.update(class_names=label_map.names(), templates=list(templates), head=head)
    rows = [
        {"image": s.image, "label": s.label, "predicted": p, "proba": [round(float(x), 6) for x in row]}
        for s, p, row in zip(samples, predicted, proba, strict=True)
    ]
    return report, rows


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str) -> None:
    """Confusion-matrix heat map with counts (rows = truth, columns = prediction)."""
    data = np.asarray(matrix)
    fig = Figure(figsize=(1.6 + 1.3 * len(names), 1.2 + 1.1 * len(names)))
    ax = fig.subplots()
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(data):
        ax.text(
            j, i, str(value), ha="center", va="center", color="white" if value > data.max() / 2 else "black"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_zeroshot_report(report: dict[str, object], rows: list[dict[str, object]], out_dir: Path) -> Path:
    """report.json, predictions.jsonl and confusion_matrix.png under `out_dir`."""
    return write_classification_report(report, rows, out_dir, "PLIP zero-shot")


def write_classification_report(
    report: dict[str, object], rows: list[dict[str, object]], out_dir: Path, title: str
) -> Path:
    """A classification report (`classification_metrics` plus `class_names`) and its per-image rows:
    report.json, predictions.jsonl and confusion_matrix.png under `out_dir`, the plot titled `title`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    plot_confusion(
        report["confusion_matrix"],
        report["class_names"],
        out_dir / "confusion_matrix.png",
        f"{title}: accuracy {report['accuracy']:.3f} (n={report['n']})",
    )
    return out_dir / "report.json"


def retrieval_report(
    zs: PlipZeroShot,
    samples: Sequence[PlipSample],
    label_map: LabelMap | None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, object]:
    """Image->text and text->image Recall@1/5/10 over the samples' own captions.

    Labelled samples get one generated caption each; a text counts as correct for an image when their
    match keys agree (the image's own caption, an identical caption, or for labelled data the same class).
    """
    captions = [
        s.caption if s.caption is not None else caption_for(label_map[s.label], random.Random(f"{seed}:{i}"))
        for i, s in enumerate(samples)
    ]
    images = zs.encode_images([s.image for s in samples], batch_size=batch_size, progress=True)
    texts = zs.encode_texts(captions)
    keys = torch.tensor([[s.image_key, s.text_key] for s in samples], dtype=torch.long)
    positives = positive_mask(keys, keys).numpy()
    similarity = (images @ texts.t()).numpy()
    return {
        "n": len(samples),
        "image_to_text": recall_at_k(similarity, positives),
        "text_to_image": recall_at_k(similarity.T, positives.T),
        "positives_per_query": float(positives.sum(axis=1).mean()),
    }


def plot_training_curve(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Losses against step, and zero-shot accuracy when the log has it."""
    steps = [r["step"] for r in rows if "loss" in r]
    evals = [(r["step"], r["zeroshot_accuracy"]) for r in rows if "zeroshot_accuracy" in r]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for key in ("loss", "loss_itc", "loss_itm"):
        ax.plot(steps, [r[key] for r in rows if "loss" in r], label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        acc_ax = ax.twinx()
        acc_ax.plot(*zip(*evals, strict=True), "o-", color="black", label="zero-shot accuracy")
        acc_ax.set_ylabel("zero-shot accuracy")
        acc_ax.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=4, frameon=False)
    ax.set_title("PLIP pre-training")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
