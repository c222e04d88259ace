"""The scale-invariant connector: the global view's tokens query the tokens of every tile.

Queries G = the global view's patch tokens (P per image). Keys/values = the patch tokens of all
tiles (T * P per image), padded tiles masked out. Each layer is self-attention over the queries,
cross-attention to the tiles, then a feed-forward block, all post-LayerNorm (BERT style). The output
is LayerNorm(layers(G) + G) projected to the language model's width: the language model always
receives P image tokens, whatever the image size.

The layers are written here rather than taken from transformers' BLIP text encoder because that
class drops the cross-attention mask (its cross-attention sees padded tiles). Parameter names follow
BERT's (`attention.self.query`, `crossattention.output.LayerNorm`, `intermediate.dense`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from pallava.models.attention import matmul_attention, prefers_matmul
from pallava.models.configuration_pa_llava import ScaleInvariantConnectorConfig


class Attention(nn.Module):
    """Multi-head attention + residual + post-LayerNorm; `kv` None means self-attention."""

    def __init__(self, config: ScaleInvariantConnectorConfig):
        super().__init__()
        width = config.hidden_size
        if width % config.num_attention_heads:
            raise ValueError(
                f"connector hidden_size {width} is not a multiple of {config.num_attention_heads} heads"
            )
        self.num_heads = config.num_attention_heads
        self.self = nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value")})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(width, width), "LayerNorm": nn.LayerNorm(width, eps=config.layer_norm_eps)}
        )
        self.dropout = config.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, h, L, d)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kv = x if kv is None else kv
        q, k, v = (
            self._heads(self.self["query"](x)),
            self._heads(self.self["key"](kv)),
            self._heads(self.self["value"](kv)),
        )
        weights = None
        dropout = self.dropout if self.training else 0.0
        # The weights for attention maps; faster in bf16 on a CPU.
        if need_weights or prefers_matmul(q, k.shape[-2], dropout):
            context, attention = matmul_attention(q, k, v, mask)
            weights = attention if need_weights else None  # (B, h, Lq, Lk)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        context = context.transpose(1, 2).flatten(2)  # (B, Lq, width)
        out = F.dropout(self.output["dense"](context), self.dropout, self.training)
        return self.output["LayerNorm"](out + x), weights


class ConnectorLayer(nn.Module):
    """Self-attention over the queries -> cross-attention to the tiles -> feed-forward, post-LN."""

    def __init__(self, config: ScaleInvariantConnectorConfig):
        super().__init__()
        self.attention = Attention(config)
        self.crossattention = Attention(config) if config.tile_cross_attention else None
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.intermediate_size)})
        self.output = nn.ModuleDict(
            {
                "dense": nn.Linear(config.intermediate_size, config.hidden_size),
                "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            }
        )
        self.act = ACT2FN[config.hidden_act]
        self.dropout = config.dropout

    def forward(self, x, tiles=None, tile_keep=None, need_weights: bool = False):
        x, _ = self.attention(x)
        weights = None
        if self.crossattention is not None:
            x, weights = self.crossattention(x, tiles, tile_keep, need_weights)
        hidden = self.act(self.intermediate["dense"](x))
        out = F.dropout(self.output["dense"](hidden), self.dropout, self.training)
        return self.output["LayerNorm"](out + x), weights


class ScaleInvariantConnector(nn.Module):
    """Maps (global tokens, tile tokens) to a fixed number of language-model embeddings."""

    def __init__(self, config: ScaleInvariantConnectorConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ConnectorLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.hidden_size, config.output_size)
        self.gradient_checkpointing = False

    def forward(
        self,
        global_tokens: torch.Tensor,
        tile_tokens: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
        return_cross_attentions: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            global_tokens: (B, P, D) patch tokens of the global view.
            tile_tokens: (B, T, P, D) patch tokens of the tiles (zeros where padded).
            tile_mask: (B, T) bool, True for real tiles.
            return_cross_attentions: also return each layer's cross-attention weights, (B, heads, P, T*P).
        Returns:
            (B, P, output_size) embeddings for the language model.
        """
        batch = global_tokens.shape[0]
        tiles = keep = None
        if self.config.tile_cross_attention:
            if tile_tokens is None or tile_mask is None:
                raise ValueError("tile_cross_attention is on: the connector needs tile_tokens and tile_mask")
            num_tiles, tile_len = tile_tokens.shape[1], tile_tokens.shape[2]
            tiles = tile_tokens.reshape(batch, num_tiles * tile_len, -1)  # (B, T*P, D)
            keep = tile_mask.repeat_interleave(tile_len, dim=1)  # (B, T*P)
            if not bool(keep.any(dim=1).all()):  # a row with every key masked has no softmax
                raise ValueError("every image needs at least one unmasked tile for cross-attention")
            # (B, 1, 1, T*P), broadcast over heads and queries; none when every tile is real (one image, or
            # a batch of one grid), which spares masking the (queries x keys) scores of every layer
            keep = None if bool(keep.all()) else keep[:, None, None, :]
        hidden, attentions = global_tokens, []
        if self.config.query_layer_norm:  # their BERT embedding module: LayerNorm (no affine), then dropout
            hidden = F.layer_norm(global_tokens, global_tokens.shape[-1:], eps=self.config.layer_norm_eps)
            hidden = F.dropout(hidden, self.config.dropout, self.training)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden, weights = torch.utils.checkpoint.checkpoint(
                    layer, hidden, tiles, keep, use_reentrant=False
                )
            else:
                hidden, weights = layer(hidden, tiles, keep, return_cross_attentions)
            if weights is not None:
                attentions.append(weights)
        output = self.projection(self.norm(hidden + global_tokens))  # (B, P, output_size)
        return (output, attentions) if return_cross_attentions else output
