"""Attention as two matrix products where that beats torch's fused kernel: bf16 on a CPU.

On this project's 2-core CPU (torch 2.13, `docs/benchmarks.md`) the fused CPU kernel behind
`scaled_dot_product_attention` runs bf16 attention at 145-175 GFLOP/s at the connector's shapes (196 queries,
1,372 tile keys, 12 heads of 64) and 140-160 at the vision tower's (197 x 197), while the same attention as
two batched products with a bf16 softmax runs at 290-415: the products are oneDNN bf16 GEMMs that accumulate
in fp32. The softmax stays in bf16 because an fp32 one (cast up and back) costs more than the products save
(73 GFLOP/s); the outputs stay within bf16 rounding of an fp32 reference (`tests/test_attention.py`).

Training (bf16 autocast) gains more: forward and backward of the tiny PLIP tower's attention (32 x 2 heads x
50 tokens) take 1.1 ms as two products against 5.1 ms in the fused kernel, 27 against 49 ms at 257 tokens
(8 x 12 heads of 64) and 57 against 98 at 577; at 1,025 they are level. Two products keep the (queries x
keys) weights for the backward pass, so with gradients they are used only up to `MAX_TRAINING_KEYS` keys.
Everywhere else (fp32, a GPU, longer training sequences) the fused kernel stays.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# The name under which `cpu_bf16_attention` is registered with transformers (the vision tower's choice).
MATMUL_ON_CPU_BF16 = "pallava_matmul_on_cpu_bf16"
# With gradients, two products keep a (queries x keys) weight matrix per head for the backward pass; past a
# 336 px ViT-L/14 tower's 577 tokens they also stop being faster (level at 1,025).
MAX_TRAINING_KEYS = 577


def prefers_matmul(query: torch.Tensor, keys: int, dropout: float = 0.0) -> bool:
    """True where two products beat the fused kernel: bf16 on a CPU; with gradients, up to
    `MAX_TRAINING_KEYS` keys. `dropout` is the attention dropout in effect (0 outside training): the
    products leave it to the fused kernel."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16 or dropout > 0:
        return False
    return not torch.is_grad_enabled() or keys <= MAX_TRAINING_KEYS


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
    """A transformers attention function: `matmul_attention` for unmasked, non-causal self-attention
    without dropout where `prefers_matmul`, transformers' SDPA path for everything else (masks, causal
    models, dropout, GPUs)."""
    plain = attention_mask is None and not getattr(module, "is_causal", False)
    faster = prefers_matmul(query, key.shape[2], dropout if module.training else 0.0)
    if not (plain and faster and key.shape[1] == query.shape[1]):
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
