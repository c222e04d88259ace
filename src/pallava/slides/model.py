"""The slide-level assistant: the scale-invariant connector reading every tissue tile of a slide.

Queries are the tissue thumbnail's patch tokens (the global view); keys/values are the patch tokens of
every tissue tile, each tile's tokens plus a 2D position embedding of the tile's centre in the thumbnail's
frame: sinusoids of x and y at `num_frequencies` octaves, mapped to the vision width by a linear layer that
starts at zero (so a trained assistant starts out unchanged and the slide stage learns to use position).
The language model still gets P image tokens, whatever the number of tiles.

Memory stays bounded: the cross-attention runs over chunks of `chunk_tiles` tiles with an online
(log-sum-exp) softmax, so no (queries x all keys) matrix and no key/value projection of all tiles exists
at once; tiles that are not tissue (padding in a batch) are masked. The same pass gives the attention mass
each tile receives (mean over layers, heads and queries): the heat map of where the answer came from.

The connector's own weights are used as they are (`model.connector`); the position embedding is new, and so
is the optional slide evidence (`slides/evidence.py`: an attention-MIL summary of the tiles added to every
image token). They are saved beside the assistant as `slide_position.safetensors`,
`slide_evidence.safetensors` and `slide_config.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pallava.models.connector import Attention, ScaleInvariantConnector
from pallava.slides.evidence import EVIDENCE_WEIGHTS, SlideEvidence

SLIDE_CONFIG = "slide_config.json"
SLIDE_WEIGHTS = "slide_position.safetensors"


class TilePositionEmbedding(nn.Module):
    """(x, y) in [0, 1] -> sinusoids at 2^k * pi, k < num_frequencies -> Linear to `width` (starts at 0)."""

    def __init__(self, width: int, num_frequencies: int = 8):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)
        self.proj = nn.Linear(4 * num_frequencies, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None] * self.freqs.to(positions.dtype)  # (..., 2, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., 4F)
        return self.proj(features.to(self.proj.weight.dtype))


def chunked_cross_attention(
    attn: Attention,
    x: torch.Tensor,
    tiles: torch.Tensor,
    keep: torch.Tensor,
    chunk: int,
    need_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attn` (a connector cross-attention block) over tiles (B, N, P, D) with keep (B, N), N in chunks.

    Equal to the block's full softmax attention (online softmax, as in FlashAttention); returns the new
    hidden states and, with `need_mass`, the attention mass per tile (B, N): mean over heads and queries.
    """
    batch, num_tiles, tile_len, _ = tiles.shape
    q = attn._heads(attn.self["query"](x)) / math.sqrt(x.shape[-1] // attn.num_heads)  # (B, h, Q, d)
    lowest = torch.finfo(q.dtype).min
    running_max = torch.full((*q.shape[:3], 1), lowest, dtype=q.dtype, device=q.device)
    total = torch.zeros_like(running_max)
    context = torch.zeros_like(q)
    spans = [(start, min(start + chunk, num_tiles)) for start in range(0, num_tiles, chunk)]
    chunk_scores = []
    for start, stop in spans:
        kv = tiles[:, start:stop].reshape(batch, (stop - start) * tile_len, -1)
        k, v = attn._heads(attn.self["key"](kv)), attn._heads(attn.self["value"](kv))
        valid = keep[:, start:stop].repeat_interleave(tile_len, dim=1)[:, None, None, :]  # (B, 1, 1, c*P)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~valid, lowest)
        new_max = torch.maximum(running_max, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores - new_max) * valid
        rescale = torch.exp(running_max - new_max)
        total = total * rescale + weights.sum(-1, keepdim=True)
        context = context * rescale + weights @ v
        running_max = new_max
        if need_mass:
            chunk_scores.append((scores, valid))
    context = context / total.clamp(min=torch.finfo(q.dtype).tiny)
    mass = None
    if need_mass:  # normalise each chunk with the final max and sum, then sum per tile
        parts = []
        for scores, valid in chunk_scores:
            probs = torch.exp(scores - running_max) * valid / total
            per_key = probs.mean(dim=(1, 2))  # (B, c*P)
            parts.append(per_key.reshape(batch, -1, tile_len).sum(-1))
        mass = torch.cat(parts, dim=1)
    out = context.transpose(1, 2).flatten(2)
    out = F.dropout(attn.output["dense"](out), attn.dropout, attn.training)
    return attn.output["LayerNorm"](out + x), mass


def slide_connector(
    connector: ScaleInvariantConnector,
    global_tokens: torch.Tensor,
    tiles: torch.Tensor,
    keep: torch.Tensor,
    chunk: int,
    need_mass: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The connector's forward, chunked: (B, P, D) queries, (B, N, P, D) tiles -> (B, P, out)."""
    if not connector.config.tile_cross_attention:
        raise ValueError(
            "the slide model needs a connector with tile cross-attention (tile_cross_attention: true)"
        )
    if not bool(keep.any(dim=1).all()):
        raise ValueError("every slide needs at least one tissue tile")
    hidden, masses = global_tokens, []
    if connector.config.query_layer_norm:
        hidden = F.layer_norm(global_tokens, global_tokens.shape[-1:], eps=connector.config.layer_norm_eps)
    for layer in connector.layers:
        hidden, _ = layer.attention(hidden)
        hidden, mass = chunked_cross_attention(layer.crossattention, hidden, tiles, keep, chunk, need_mass)
        if mass is not None:
            masses.append(mass)
        inner = layer.act(layer.intermediate["dense"](hidden))
        out = F.dropout(layer.output["dense"](inner), layer.dropout, layer.training)
        hidden = layer.output["LayerNorm"](out + hidden)
    return connector.projection(connector.norm(hidden + global_tokens)), masses


class SlideAssistant(nn.Module):
    """A trained assistant (`PaLlava`) plus the tile position embedding; answers about whole slides."""

    def __init__(self, assistant, chunk_tiles: int = 256, num_frequencies: int = 8):
        super().__init__()
        self.assistant = assistant
        self.model = assistant.model
        self.chunk_tiles = chunk_tiles
        width = self.model.config.connector_config.hidden_size
        self.position = TilePositionEmbedding(width, num_frequencies).to(self.model.device)
        self.evidence: SlideEvidence | None = None  # set by the slide stage (`slide.evidence`) or loaded
        self.settings: dict = {}
        self.tiling: dict | None = None

    # --- persistence ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> SlideAssistant:
        """Load an assistant folder; its slide position embedding when it has one (else a fresh, zero one)."""
        from pallava.inference import PaLlava

        return cls.from_assistant(PaLlava.from_pretrained(directory, device=device), directory)

    @classmethod
    def from_assistant(cls, assistant, directory: str | Path | None = None) -> SlideAssistant:
        settings = {}
        if directory is not None and (Path(directory) / SLIDE_CONFIG).is_file():
            settings = json.loads((Path(directory) / SLIDE_CONFIG).read_text())
        slide = cls(assistant, settings.get("chunk_tiles", 256), settings.get("num_frequencies", 8))
        if directory is not None and (Path(directory) / SLIDE_WEIGHTS).is_file():
            slide.position.load_state_dict(load_file(str(Path(directory) / SLIDE_WEIGHTS)))
        slide.position.to(assistant.model.device)
        if settings.get("evidence"):
            evidence = settings["evidence"]
            slide.evidence = SlideEvidence(
                evidence["dim"],
                evidence["classes"],
                slide.model.config.text_config.hidden_size,
                evidence["hidden"],
                evidence["dropout"],
            )
            slide.evidence.load_state_dict(load_file(str(Path(directory) / EVIDENCE_WEIGHTS)))
            slide.evidence.to(assistant.model.device).eval()
        slide.settings = settings  # what the slide stage recorded: init assistant, tiling, PLIP
        slide.tiling = settings.get("tiling")
        return slide

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        directory = Path(directory)
        self.assistant.save_pretrained(directory)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.position.state_dict().items()},
            str(directory / SLIDE_WEIGHTS),
        )
        settings = {
            "chunk_tiles": self.chunk_tiles,
            "num_frequencies": self.position.num_frequencies,
            "evidence": self.evidence.settings if self.evidence is not None else None,
            **(extra or {}),
        }
        if self.evidence is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.evidence.state_dict().items()},
                str(directory / EVIDENCE_WEIGHTS),
            )
        (directory / SLIDE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")

    # --- images -----------------------------------------------------------------------------------
    def image_embeddings(
        self,
        global_tokens: torch.Tensor,
        tile_tokens: torch.Tensor,
        positions: torch.Tensor,
        tile_mask: torch.Tensor | None = None,
        need_mass: bool = False,
        tile_summaries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, P, hidden) language-model embeddings of B slides, and the attention mass per tile (B, N).

        global_tokens (B, P, D), tile_tokens (B, N, P, D), positions (B, N, 2), tile_mask (B, N) bool
        (True = tissue tile; default all); tile_summaries (B, N, D), the tiles' image embeddings, which a
        model with slide evidence needs.
        """
        dtype = self.model.connector.projection.weight.dtype
        device = self.model.connector.projection.weight.device
        if tile_mask is None:
            tile_mask = torch.ones(tile_tokens.shape[:2], dtype=torch.bool)
        tiles = tile_tokens.to(device, dtype) + self.position(positions.to(device))[:, :, None, :].to(dtype)
        embeds, masses = slide_connector(
            self.model.connector,
            global_tokens.to(device, dtype),
            tiles,
            tile_mask.to(device),
            self.chunk_tiles,
            need_mass,
        )
        mass = torch.stack(masses).mean(0) if masses else None
        if self.evidence is not None:
            if tile_summaries is None:
                raise ValueError("this slide model reads slide evidence: pass the tiles' tile_summaries")
            shift, _ = self.evidence(tile_summaries.to(device), tile_mask.to(device), positions.to(device))
            embeds = embeds + shift.to(embeds.dtype)
        return embeds, mass

    def batch_embeddings(
        self, batch: dict, need_mass: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and heat maps of a batch of slides as `train.slide.collate` pads them."""
        return self.image_embeddings(
            batch["global_tokens"],
            batch["tile_tokens"],
            batch["positions"],
            batch["tile_mask"],
            need_mass,
            batch["tile_summaries"],
        )

    def features_embeddings(
        self, features, need_mass: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and heat map of one slide's `SlideFeatures`."""
        return self.image_embeddings(
            features.global_tokens[None],
            features.tile_tokens[None],
            features.positions[None],
            need_mass=need_mass,
            tile_summaries=features.tile_summaries[None],
        )

    # --- text -------------------------------------------------------------------------------------
    def loss(
        self, batch: dict, embeds: torch.Tensor, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Summed cross-entropy over the answer tokens (`<image>` runs take `embeds`), and their count; with
        `weights` (one per sequence) each sequence's tokens count that many times in both."""
        device = embeds.device
        input_ids = batch["input_ids"].to(device)
        inputs = self.model.merge_image_embeddings(input_ids, embeds)
        mask = batch["attention_mask"].to(device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = (
            self.model.language_model(
                inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
            )
            .logits[:, :-1]
            .float()
        )
        targets = batch["labels"][:, 1:].to(device)
        if weights is None:
            summed = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            return summed, int((targets != -100).sum())
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counted = (targets != -100).float() * weights.to(device)[:, None]
        return (per_token * counted).sum(), float(counted.sum())

    @torch.inference_mode()
    def answer(self, embeds: torch.Tensor, question: str, max_new_tokens: int = 32) -> str:
        """Greedy answer to `question` about a slide whose image embeddings (1, P, hidden) are given."""
        processor = self.assistant.processor
        ids, _ = processor.encode_conversation(processor.question(question), add_generation_prompt=True)
        input_ids = torch.tensor([ids], device=embeds.device)
        inputs = self.model.merge_image_embeddings(input_ids, embeds)
        output = self.model.language_model.generate(
            inputs_embeds=inputs,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.pad_id,
        )
        new = output[0].tolist()
        if len(new) > len(ids) and new[: len(ids)] == ids:  # some versions return the prompt ids too
            new = new[len(ids) :]
        return processor.decode(new)
