"""Batch normalisation for the vision tower's convolutional stems, frozen with their weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StemBatchNorm(nn.Module):
    """Batch normalisation over channels that uses its running statistics unless its weights train.

    Not `nn.BatchNorm2d`: that one keeps an integer `num_batches_tracked` counter, and every weight file
    pallava reads must be floating point (`convert.checkpoint.check_weights`); the momentum here is fixed.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_statistics = self.training and self.weight.requires_grad
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            batch_statistics,
            self.momentum,
            self.eps,
        )
