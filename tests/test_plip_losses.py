"""PLIP losses: ITC on hand-checkable cases, symmetry, positives from match keys, hard-negative sampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from pallava.models.plip.losses import (
    clip_loss,
    contrastive_loss,
    itm_loss,
    positive_mask,
    positive_targets,
    sample_hard_negatives,
)


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_aligned_features_at_low_temperature_give_near_zero_loss():
    feats = torch.eye(8)  # orthonormal: cos = 1 for the pair, 0 otherwise
    assert clip_loss(feats, feats.clone(), temperature=0.01).item() < 1e-6


def test_unrelated_features_give_log_batch():
    batch = 16
    identical = F.normalize(torch.ones(batch, 4), dim=1)  # every logit equal -> uniform softmax
    assert clip_loss(identical, identical, temperature=0.07).item() == pytest.approx(
        math.log(batch), abs=1e-5
    )
    # Independent random directions in a wide space are nearly orthogonal: close to log(batch).
    loss = clip_loss(_unit(batch, 4096, 1), _unit(batch, 4096, 2), temperature=1.0).item()
    assert loss == pytest.approx(math.log(batch), abs=0.1)


def test_shuffled_pairs_cost_more_than_aligned():
    feats = _unit(12, 64)
    aligned = clip_loss(feats, feats, 0.07).item()
    shuffled = clip_loss(
        feats, feats[torch.randperm(12, generator=torch.Generator().manual_seed(0))], 0.07
    ).item()
    assert shuffled > math.log(12) > aligned


def test_loss_is_symmetric_in_images_and_texts():
    images, texts = _unit(10, 32, 3), _unit(10, 32, 4)
    assert clip_loss(images, texts, 0.1).item() == pytest.approx(
        clip_loss(texts, images, 0.1).item(), rel=1e-6
    )


def test_contrastive_loss_matches_hand_computation():
    images, texts = _unit(3, 8, 5), _unit(3, 8, 6)
    temp = 0.5
    logits = images @ texts.t() / temp
    by_hand = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    targets = torch.eye(3)
    assert contrastive_loss(images, texts, images, texts, temp, targets, targets).item() == pytest.approx(
        by_hand.item()
    )


def test_match_keys_make_same_class_pairs_positive():
    keys = torch.tensor([[0, 100], [1, 100], [2, 200]])  # samples 0 and 1 share a caption / class
    mask = positive_mask(keys, keys)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    targets = positive_targets(keys, keys)
    assert torch.allclose(targets.sum(1), torch.ones(3))
    assert targets[0, 1] == pytest.approx(0.5)
    # With class-level keys, features that only separate classes are already optimal.
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert clip_loss(feats, feats, 0.01, keys).item() == pytest.approx(math.log(2) * 2 / 3, abs=1e-4)


def test_positive_targets_require_a_positive():
    with pytest.raises(ValueError, match="no positive"):
        positive_targets(torch.tensor([[1, 1]]), torch.tensor([[2, 2]]))


def test_hard_negative_sampler_never_returns_a_positive_or_duplicate_caption():
    gen = torch.Generator().manual_seed(0)
    # 12 samples: images 0..11; captions repeat (0,1 share one; 2,3,4 share one); class-level keys on 8..11.
    text_keys = torch.tensor([50, 50, 60, 60, 60, 70, 80, 90, 7, 7, 7, 7])
    keys = torch.stack([torch.arange(12), text_keys], dim=1)
    forbidden = positive_mask(keys, keys)
    for trial in range(200):
        similarity = torch.randn(12, 12, generator=gen) * 5
        similarity += 50 * forbidden  # positives look most similar: the sampler must still skip them
        index, valid = sample_hard_negatives(similarity, keys, keys, gen)
        assert valid.all()
        assert not forbidden[torch.arange(12), index].any(), f"trial {trial}"


def test_hard_negative_sampler_prefers_similar_negatives():
    gen = torch.Generator().manual_seed(1)
    keys = torch.arange(6).unsqueeze(1).repeat(1, 2)
    similarity = torch.zeros(6, 6)
    similarity[:, 3] = 10.0  # key 3 is the hardest negative for everyone else
    draws = torch.stack([sample_hard_negatives(similarity, keys, keys, gen)[0] for _ in range(50)])
    assert (draws[:, [0, 1, 2, 4, 5]] == 3).float().mean() > 0.9


def test_hard_negative_sampler_flags_queries_without_negatives():
    keys = torch.tensor([[0, 1], [1, 1], [2, 2]])  # 0 and 1 share a caption; 2 is alone
    index, valid = sample_hard_negatives(torch.zeros(3, 2), keys, keys[:2])  # keys: only samples 0, 1
    assert valid.tolist() == [False, False, True]
    assert index[2].item() in (0, 1)


def test_itm_loss_ignores_invalid_pairs():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([1, 0, 0])
    clean = itm_loss(logits, labels, torch.tensor([True, True, False])).item()
    assert clean < 0.01 < itm_loss(logits, labels).item()
    assert itm_loss(logits, labels, torch.zeros(3, dtype=torch.bool)).item() == 0.0
