"""Attention as two matrix products where that beats torch's fused kernel: inference in bf16 on a CPU.

On this project's 2-core CPU (torch 2.13, `docs/benchmarks.md`) the fused CPU kernel behind
`scaled_dot_product_attention` runs bf16 attention at 145-175 GFLOP/s at the connector's shapes (196 queries,
1,372 tile keys, 12 heads of 64) and 140-160 at the vision tower's (197 x 197), while the same attention as
two batched products with a bf16 softmax runs at 290-415: the products are oneDNN bf16 GEMMs that accumulate
in fp32. The softmax stays in bf16 because an fp32 one (cast up and back) costs more than the products save
(73 GFLOP/s); the outputs stay within bf16 rounding of an fp32 reference (`tests/test_attention.py`).

Everywhere else (training, fp32, a GPU) the fused kernel stays: there it is as fast or faster, and it keeps
the memory of the (queries x keys) weights out of the autograd graph.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# The name under which `cpu_bf16_attention` is registered with transformers (the vision tower's choice).
MATMUL_ON_CPU_BF16 = "pallava_matmul_on_cpu_bf16"


def prefers_matmul(query: torch.Tensor) -> bool:
    """True where two products beat the fused kernel: bf16 on a CPU, no gradient being recorded."""
    return query.device.type == "cpu" and query.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def matmul_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v, and the weights: (B, h, Lq, d) queries, (B, h, Lk, d) keys and values.

    `mask` (broadcast to (B, h, Lq, Lk)) is bool, True where a key may be attended to. Every row needs one.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query * scale) @ key.transpose(-1, -2)  # scaling the queries: Lq x d products, not Lq x Lk
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return weights @ value, weights


def cpu_bf16_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: `matmul_attention` for unmasked, non-causal attention where
    `prefers_matmul`, transformers' SDPA path for everything else (masks, causal models, training, GPUs)."""
    plain = attention_mask is None and not getattr(module, "is_causal", False) and not module.training
    if not (plain and prefers_matmul(query) and key.shape[1] == query.shape[1]):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    output, _ = matmul_attention(query, key, value, scale=scaling)
    return output.transpose(1, 2).contiguous(), None  # (B, Lq, h, d), as transformers' functions return


AttentionInterface.register(MATMUL_ON_CPU_BF16, cpu_bf16_attention)


def use_cpu_bf16_attention(model: nn.Module) -> None:
    """Give `model` (a transformers model on SDPA, e.g. the vision tower) `cpu_bf16_attention`.

    Another choice made on purpose (eager, flash attention) is kept. The choice is not saved with the
    model: transformers leaves `_attn_implementation` out of config.json.
    """
    if model.config._attn_implementation in (None, "sdpa"):
        model.set_attn_implementation(MATMUL_ON_CPU_BF16)
