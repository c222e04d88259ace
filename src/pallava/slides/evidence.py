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
  trained assistant starts out unchanged and the slide stage teaches the language model to read it;
- so are its class probabilities (a third map: with the summary alone, the LLM named a colon carcinoma
  "lung squamous cell carcinoma" on 2 of 15 dev slides where the MIL itself was right);
- and where its attention lies: the attention mass in each quadrant of the tissue (tile centres in the
  global view's frame, whose centre is the tissue's), through its own zero-initialised linear layer. The
  MIL's attention finds the tumour tiles (tile AUROC 0.96 on the quickstart's dev slides), so this is the
  tumour's quadrant(s) on a tumour slide; without it the slide model named the quadrant on none of 15.

The language model still gets P image tokens; the heat map is still the connector's cross-attention.
Saved beside the slide model as `slide_evidence.safetensors` (its settings in `slide_config.json`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pallava.slides.mil import AttentionMIL, train_mil

EVIDENCE_WEIGHTS = "slide_evidence.safetensors"
# The class probabilities and quadrant masses (each summing to 1) enter scaled to the pooled summary's size
# (norm 12-25 on the quickstart's slides), so that their maps learn at the summary's pace: unscaled, the LLM
# named the quadrant on 1 of 15 dev slides although the masses alone gave it on 12.
SIGNAL_SCALE = 16.0


class SlideEvidence(nn.Module):
    """A frozen attention-MIL over tile embeddings and zero-initialised maps of its summary, class
    probabilities and quadrant masses to the LLM."""

    def __init__(self, dim: int, classes: Sequence[str], width: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.classes = list(classes)
        self.mil = AttentionMIL(dim, len(self.classes), hidden, dropout).requires_grad_(False).eval()
        self.to_tokens = nn.Linear(hidden, width)
        self.classes_to_tokens = nn.Linear(len(self.classes), width, bias=False)
        self.quadrants_to_tokens = nn.Linear(4, width, bias=False)
        for layer in (self.to_tokens, self.classes_to_tokens, self.quadrants_to_tokens):
            nn.init.zeros_(layer.weight)
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
        """Fit the MIL on (tile embeddings (N, D), slide label) pairs; the maps to the LLM stay at zero."""
        mil, classes = train_mil([s.float() for s in summaries], labels, epochs, seed=seed)
        evidence = cls(summaries[0].shape[1], classes, width, mil.config["hidden"], mil.config["dropout"])
        evidence.mil.load_state_dict(mil.state_dict())
        return evidence

    def train(self, mode: bool = True) -> SlideEvidence:
        super().train(mode)
        self.mil.eval()  # fitted and frozen: no dropout while the answers train
        return self

    def forward(
        self, summaries: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) tile embeddings, keep (B, N), tile centres (B, N, 2) as (x, y) in 0..1 -> the shift of
        every image token (B, 1, width) and the MIL's class logits (B, C)."""
        dtype = self.to_tokens.weight.dtype
        logits, attention, pooled = self.mil.pool(summaries.to(dtype), keep)
        shift = (
            self.to_tokens(pooled)
            + self.classes_to_tokens(SIGNAL_SCALE * logits.softmax(-1))
            + self.quadrants_to_tokens(SIGNAL_SCALE * quadrant_mass(attention, positions))
        )
        return shift[:, None, :], logits


def quadrant_mass(attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, N) attention, (B, N, 2) tile centres (x, y) -> (B, 4) mass per quadrant, in the order of
    `slides.virtual.QUADRANTS` (upper left, upper right, lower left, lower right)."""
    index = (positions[..., 1] >= 0.5).long() * 2 + (positions[..., 0] >= 0.5).long()
    mass = attention.new_zeros(attention.shape[0], 4)
    return mass.scatter_add(1, index.to(attention.device), attention)
