"""Attention-MIL baseline (gated attention pooling, Ilse et al. 2018) over cached PLIP tile embeddings.

One bag per slide; the classes are the slide labels (the carcinoma class when there is tumour, else the
organ's benign class), so one classifier answers presence, type and organ. The attention weights are its
heat map. Trained on the same virtual slides as the slide stage; saved as `attention-mil.safetensors` and
`attention-mil.json` (classes, sizes) inside the slide model's folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

MIL_WEIGHTS = "attention-mil.safetensors"
MIL_CONFIG = "attention-mil.json"


class AttentionMIL(nn.Module):
    """a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))); slide logits = head(sum_i a_i h_i)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.config = {"dim": dim, "num_classes": num_classes, "hidden": hidden, "dropout": dropout}
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, hidden)
        self.attention_u = nn.Linear(hidden, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag (N, dim) -> (class logits (C,), attention (N,) summing to 1)."""
        logits, attention, _ = self.pool(bag[None], torch.ones(bag.shape[:1], dtype=torch.bool)[None])
        return logits[0], attention[0]

    def pool(self, bags: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded bags (B, N, dim) with keep (B, N) -> logits (B, C), attention (B, N), pooled (B, hidden)."""
        hidden = self.embed(bags)
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        scores = self.attention_w(gate).squeeze(-1).masked_fill(~keep, float("-inf"))
        attention = scores.softmax(-1)
        pooled = (attention[..., None] * hidden).sum(1)
        return self.head(pooled), attention, pooled


def slide_label(truth: dict) -> str:
    return truth["tumour_label"] if truth["tumour_present"] else truth["benign_label"]


def train_mil(
    bags: Sequence[torch.Tensor], labels: Sequence[str], epochs: int = 40, lr: float = 1e-3, seed: int = 0
) -> tuple[AttentionMIL, list[str]]:
    """Fit on (bag, slide label) pairs, one slide per step; returns the model and its class order."""
    classes = sorted(set(labels))
    torch.manual_seed(seed)
    model = AttentionMIL(bags[0].shape[1], len(classes))
    # One slide a step makes thousands of small steps, whose cost is the optimizer's per-tensor loop: the
    # fused update took 40 epochs of 150 bags of 25-75 tiles from 11.2 s to 8.1 s (4 alternated runs each).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=True)
    targets = [torch.tensor([classes.index(label)]) for label in labels]
    order = list(range(len(bags)))
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        rng.shuffle(order)
        for i in order:
            logits, _ = model(bags[i].float())
            loss = F.cross_entropy(logits[None], targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), classes


def save_mil(
    model: AttentionMIL, classes: list[str], directory: str | Path, extra: dict | None = None
) -> None:
    directory = Path(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / MIL_WEIGHTS))
    (directory / MIL_CONFIG).write_text(
        json.dumps({**model.config, "classes": classes, **(extra or {})}, indent=2)
    )


def load_mil(directory: str | Path) -> tuple[AttentionMIL, list[str], dict] | None:
    """The baseline saved in a slide model's folder, or None when it has none."""
    directory = Path(directory)
    if not (directory / MIL_CONFIG).is_file():
        return None
    config = json.loads((directory / MIL_CONFIG).read_text())
    model = AttentionMIL(config["dim"], config["num_classes"], config["hidden"], config["dropout"])
    model.load_state_dict(load_file(str(directory / MIL_WEIGHTS)))
    return model.eval(), config["classes"], config
