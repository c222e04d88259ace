"""PLIP losses: image-text contrastive (ITC) with distributed gathering, hard-negative sampling for matching
(ITM).

Pairs are identified by `match_keys` (N, 2): an image key and a text key. Two samples match when either key
is equal, so the same image with another caption, or another image with the identical caption (or, for
labelled data, the same class), is a positive for ITC and is never drawn as an ITM negative.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:  # older torch builds (a cluster's own): the same collective under its former name
    from torch.distributed._functional_collectives import (
        all_gather_tensor_autograd as all_gather_single_autograd,
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0; gradients flow back to each local shard.

    The backward pass sums the gradients that every process's loss sends to a shard, so after the
    data-parallel gradient average each process holds the gradient of the global-batch loss.
    """
    if not _distributed():
        return tensor
    return all_gather_single_autograd(tensor.contiguous(), 0, dist.group.WORLD)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0, without gradient (momentum features, keys)."""
    if not _distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def local_offset(batch_size: int) -> int:
    """Index of this process's first sample in the gathered global batch (equal shards)."""
    return dist.get_rank() * batch_size if _distributed() else 0


def positive_mask(query_keys: torch.Tensor, key_keys: torch.Tensor) -> torch.Tensor:
    """(Q, K) bool: query i and key j are the same pair (any match key equal)."""
    return (query_keys[:, None, :] == key_keys[None, :, :]).any(dim=-1)


def positive_targets(query_keys: torch.Tensor, key_keys: torch.Tensor) -> torch.Tensor:
    """(Q, K) target distribution: uniform over each query's positives (every query has at least one)."""
    mask = positive_mask(query_keys, key_keys).float()
    counts = mask.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError(
            "positive_targets: a query has no positive key; the keys must include the query's own pair"
        )
    return mask / counts


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij * log softmax(logits)_ij."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def contrastive_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    temperature: torch.Tensor | float,
    targets_i2t: torch.Tensor,
    targets_t2i: torch.Tensor,
) -> torch.Tensor:
    """Symmetric ITC: local image queries against text keys and local text queries against image keys.

    image_feats, text_feats: (B, D) normalised queries; image_keys, text_keys: (K, D) normalised keys (the
    global batch, plus a queue when momentum is on); targets_*: (B, K) rows summing to 1.
    """
    logits_i2t = image_feats @ text_keys.t() / temperature  # (B, K)
    logits_t2i = text_feats @ image_keys.t() / temperature  # (B, K)
    return (soft_cross_entropy(logits_i2t, targets_i2t) + soft_cross_entropy(logits_t2i, targets_t2i)) / 2


def clip_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temperature: torch.Tensor | float,
    match_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITC over the global batch without momentum: pair i is (image i, text i), plus any key matches.

    Features are gathered across processes with gradient; each process scores its own queries.
    """
    batch = image_feats.shape[0]
    if match_keys is None:
        match_keys = torch.arange(batch, device=image_feats.device).unsqueeze(1) + local_offset(batch)
    all_images, all_texts = gather_with_grad(image_feats), gather_with_grad(text_feats)
    targets = positive_targets(match_keys, gather_no_grad(match_keys))
    return contrastive_loss(image_feats, text_feats, all_images, all_texts, temperature, targets, targets)


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor,
    query_keys: torch.Tensor,
    key_keys: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, draw one negative key with probability softmax(similarity) over non-matching keys.

    similarity: (Q, K) logits; *_keys: match keys. Returns (indices (Q,), valid (Q,) bool); a query whose
    keys all match it has no negative (valid False, index 0). A matching key is never returned.
    """
    allowed = ~positive_mask(query_keys, key_keys)  # (Q, K)
    weights = F.softmax(similarity.float(), dim=1) + 1e-6  # the floor keeps far negatives drawable
    weights = weights * allowed
    valid = allowed.any(dim=1)
    weights[~valid] = 1.0  # placeholder rows, masked out by `valid`
    indices = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(valid, indices, torch.zeros_like(indices)), valid


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of match logits (N, 2) against labels (N,) (1 = match), over the `valid` pairs."""
    if valid is not None:
        logits, labels = logits[valid], labels[valid]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)
