"""`benchmarks/backbone.py`: the projection into a frozen text space learns the classes the features hold,
and nothing where they hold none; the backbone is PLIP's frozen ImageNet stem."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from benchmarks.backbone import align_to_text, backbone_features, load_backbone

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


def test_the_backbone_pools_the_frozen_stems_imagenet_features():
    from PIL import Image

    backbone = load_backbone()
    assert not backbone.training
    tile = Image.fromarray((torch.rand(256, 256, 3) * 255).to(torch.uint8).numpy())
    features = backbone_features(backbone, [tile, tile.rotate(90)])
    assert features.shape == (2, 1280)
    assert torch.isfinite(features).all() and (features >= 0).all()  # after the head's ReLU6
    assert not torch.allclose(features[0], features[1])
