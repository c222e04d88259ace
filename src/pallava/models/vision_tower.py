"""The CLIP vision tower that PLIP and the assistant share: transformers' `CLIPVisionModel`, optionally with a
convolutional stem in place of its patch projection (`conv_stem: true` in the vision config).

Why a stem: a ViT trained from scratch on a few thousand images learns slowly what a patch projection
cannot see inside its patch, the texture of nuclei and their spacing. A stack of small stride-2
convolutions (each 3x3, batch-normalised, ReLU) that ends on the same token grid gives the transformer local
features from the first step; it is the standard remedy for small-data ViTs. The tiny preset uses it;
the paper's ViT-B/16 keeps PLIP's released patch projection. Measured in `docs/plip.md`.

The stem's batch statistics are frozen whenever its weights are: a frozen tower (the assistant's stage
1 and 2) computes the same features in `train()` and `eval()` mode, so cached features stay valid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from pallava.models.pretrained_stem import PretrainedStem
from pallava.models.stem_norm import StemBatchNorm

# The vision config's field that asks for the stem (kept in config.json like any other field).
CONV_STEM = "conv_stem"
# How many residual 3x3 blocks follow each stride-2 convolution after the first (0: the plain stem).
CONV_STEM_BLOCKS = "conv_stem_blocks"
# The field that asks for a frozen ImageNet backbone as the stem (its name; see `PretrainedStem`).
PRETRAINED_STEM = "pretrained_stem"
STEM_BASE_CHANNELS = 16  # the first convolution's channels; each later one doubles, up to the width


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (batch norm, ReLU) added to their input. The tower starts the second norm's scale
    at zero, so a new block passes its (non-negative) input through unchanged until training moves it."""

    def __init__(self, channels: int):
        super().__init__()
        self.first = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.first_norm = StemBatchNorm(channels)
        self.second = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.second_norm = StemBatchNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.relu(self.first_norm(self.first(x)))
        return F.relu(x + self.second_norm(self.second(residual)))


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions (batch norm, ReLU) from pixels down to the patch grid, then a 1x1 projection
    to the tower's width: for patch 32, five of them (16, 32, 64, 128, 128 channels at width 128). With
    `blocks` > 0, that many residual blocks follow every stride-2 convolution but the first (whose 112 x 112
    map would cost as much as all the others): a small ResNet in front of the transformer."""

    def __init__(self, in_channels: int, width: int, patch_size: int, blocks: int = 0):
        super().__init__()
        stride_2_convs = round(math.log2(patch_size))
        if 2**stride_2_convs != patch_size:
            raise ValueError(f"conv_stem needs a power-of-two patch_size, got {patch_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(stride_2_convs):
            out = min(width, STEM_BASE_CHANNELS * 2**index)
            conv = nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False)
            layers += [conv, StemBatchNorm(out), nn.ReLU(inplace=True)]
            if index > 0:
                layers += [ResidualBlock(out) for _ in range(blocks)]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: `CLIPVisionEmbeddings` reads the input dtype from it."""
        return self.layers[0].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


class BackboneEmbeddings(CLIPVisionEmbeddings):
    """CLIP's embeddings over a `PretrainedStem` that also take the frozen backbone's maps (N, C, H/s, W/s)
    in place of the pixels: transformers' own check of the image size would refuse them. Same fields, so
    saved towers keep their layout."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if not self.patch_embedding.takes_maps(pixel_values):
            return super().forward(pixel_values, interpolate_pos_encoding)
        if pixel_values.shape[-2:] != (self.image_size // self.patch_size,) * 2:
            raise ValueError(
                f"backbone maps of {tuple(pixel_values.shape[-2:])} cells; the tower reads "
                f"{self.image_size // self.patch_size} x {self.image_size // self.patch_size}"
            )
        patch_embeds = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(len(pixel_values), 1, -1)
        return torch.cat([class_embeds, patch_embeds], dim=1) + self.position_embedding(self.position_ids)


class PallavaVisionModel(CLIPVisionModel):
    """`CLIPVisionModel` that builds the convolutional stem when its config asks for it; otherwise the same
    model, weights and file layout. Load saved towers with `PallavaVisionModel.from_pretrained`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__(config)
        if backbone := pretrained_stem_name(config):
            # the embeddings transformers built and initialised, with a forward that also takes maps (a new
            # module would draw its random weights again and move every later draw)
            self.embeddings.__class__ = BackboneEmbeddings
            self.embeddings.patch_embedding = PretrainedStem(backbone, config)
        elif uses_conv_stem(config):
            blocks = int(getattr(config, CONV_STEM_BLOCKS, 0) or 0)
            stem = ConvStem(config.num_channels, config.hidden_size, config.patch_size, blocks)
            stem.apply(self._init_weights)
            for block in stem.modules():
                if isinstance(block, ResidualBlock):  # a new block starts as the identity
                    nn.init.zeros_(block.second_norm.weight)
            self.embeddings.patch_embedding = stem


def uses_conv_stem(config: CLIPVisionConfig) -> bool:
    return bool(getattr(config, CONV_STEM, False))


def pretrained_stem_name(config: CLIPVisionConfig) -> str | None:
    return getattr(config, PRETRAINED_STEM, None) or None


def build_vision_tower(config: CLIPVisionConfig) -> CLIPVisionModel:
    """A randomly initialised tower: `PallavaVisionModel` when the config asks for the stem, transformers'
    `CLIPVisionModel` otherwise (the subclass draws its random weights in another order, and a plain tower
    should start exactly where transformers' own does)."""
    if uses_conv_stem(config) or pretrained_stem_name(config):
        return PallavaVisionModel(config)
    return CLIPVisionModel(config)
