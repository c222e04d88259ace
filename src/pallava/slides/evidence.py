"""Slide evidence: an attention-MIL summary of every tile that enters the slide model's image tokens.

The connector's queries are the tissue thumbnail's tokens: they see where tissue is, and their attention
finds tumour tiles (pointing game 0.93 on the quickstart's dev slides), but a tiny language model reading
P such tokens answered "is there carcinoma?" worse than attention-MIL over the same tiles (0.73 against
0.97). Slide labels are what MIL is built for, so the slide model carries one:

- gated attention pooling (`AttentionMIL`) over each tile's image embedding (the vision tower's own
  post-normed class token, cached with the tile tokens: no second encoder is needed to ask a slide);
- fitted first, on the training slides' labels (the carcinoma class, or the organ's benign class), then
  frozen;
- its pooled summary is mapped by a linear layer that starts at zero and added to every image token, so a
  trained assistant starts out unchanged and the slide stage teaches the language model to read it.

The language model still gets P image tokens; the heat map is still the connector's cross-attention.
Saved beside the slide model as `slide_evidence.safetensors` (its settings in `slide_config.json`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pallava.slides.mil import AttentionMIL, train_mil

EVIDENCE_WEIGHTS = "slide_evidence.safetensors"


class SlideEvidence(nn.Module):
    """A frozen attention-MIL over tile embeddings and a zero-initialised map of its summary to the LLM."""

    def __init__(self, dim: int, classes: Sequence[str], width: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.classes = list(classes)
        self.mil = AttentionMIL(dim, len(self.classes), hidden, dropout).requires_grad_(False).eval()
        self.to_tokens = nn.Linear(hidden, width)
        nn.init.zeros_(self.to_tokens.weight)
        nn.init.zeros_(self.to_tokens.bias)

    @property
    def settings(self) -> dict:
        config = self.mil.config
        return {
            "dim": config["dim"],
            "hidden": config["hidden"],
            "dropout": config["dropout"],
            "classes": self.classes,
        }

    @classmethod
    def fit(
        cls,
        summaries: Sequence[torch.Tensor],
        labels: Sequence[str],
        width: int,
        epochs: int = 40,
        seed: int = 0,
    ) -> SlideEvidence:
        """Fit the MIL on (tile embeddings (N, D), slide label) pairs; the map to the LLM stays at zero."""
        mil, classes = train_mil([s.float() for s in summaries], labels, epochs, seed=seed)
        evidence = cls(summaries[0].shape[1], classes, width, mil.config["hidden"], mil.config["dropout"])
        evidence.mil.load_state_dict(mil.state_dict())
        return evidence

    def train(self, mode: bool = True) -> SlideEvidence:
        super().train(mode)
        self.mil.eval()  # fitted and frozen: no dropout while the answers train
        return self

    def forward(self, summaries: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) tile embeddings, keep (B, N) -> the shift of every image token (B, 1, width) and the
        MIL's class logits (B, C)."""
        dtype = self.to_tokens.weight.dtype
        logits, _, pooled = self.mil.pool(summaries.to(dtype), keep)
        return self.to_tokens(pooled)[:, None, :], logits
