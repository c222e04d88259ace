"""Training-time augmentation for H&E tiles.

What a model must survive on another lab's slides, and the augmentation that teaches it:

- **stain and scanner colour**: HED jitter (Tellez et al., 2018): the image is unmixed into haematoxylin,
  eosin and DAB optical densities with the Ruifrok-Johnston matrix, each channel is scaled by
  U(1 - s, 1 + s) and shifted by U(-s, s), and mixed back; plus a mild brightness/contrast/saturation jitter.
  Another lab's dyes differ in hue, not only in amount: with `stain_vectors` v the densities are mixed back
  with haematoxylin and eosin vectors whose components are moved by U(-v, v) (then made unit length again),
  so the model also sees bluer-black or purpler haematoxylin and pinker or more orange eosin; and with
  `stain_amount` a each dye's density is multiplied by its own log-uniform factor in [1 / a, a]: another
  lab's sections carry more or less of each dye (the other lab's tiles in `samples/crc` hold about three
  times LC25000 colon's haematoxylin, far outside the jitter's +/- s);
- **magnification**: a random scale, log-uniform in [1 / max_zoom, max_zoom]: above 1 a random crop of 1/scale
  of the side resized up (a higher-power view), below 1 the tile continued by mirroring and shrunk (a lower-
  power view); and resolution jitter: down-sampled by 2-4x and back up (a blurrier, lower-resolution scan);
- **colour as a shortcut**: in LC25000 the two colon classes differ in hue as much as in form, and a model
  trained on them reads colour (grey dev images: lung 0.54, colon 0.58 zero-shot against 0.90; a hue turned
  by 18 degrees: colon 0.61). `hue` turns the colour circle by up to +/- that fraction (a rotation of RGB
  about the grey axis) and `grayscale` makes that share of views grey, so form has to carry the class
  (off in the shipped recipes: the tiny tower lost more than it gained, docs/plip.md);
- **the lab behind a dataset**: with several training datasets, `stain_mix` re-stains that share of views with
  a stain drawn between its own dataset's and another's (`processing.stain_mix`), so no organ keeps a colour
  of its own;
- **orientation**: flips and 90-degree rotations (tissue has no up or down).

Everything is a function of the `random.Random` passed in, so training stays reproducible and resumable.

Stain normalisation lives in `processing.stain_norm`. torchstain's own augmentor draws from numpy's global
random state and always re-maps to the reference stain, so the jitter above (a few lines of linear algebra)
is done here with a seeded generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pallava.processing.stain_mix import StainBank

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical-density space, as
# used by scikit-image's rgb2hed; the third row completes the basis.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
# -log(intensity) of every uint8 value (0 read as 1e-6, as for any optical density of black)
_OPTICAL_DENSITY = (-np.log(np.maximum(np.arange(256) / 255.0, 1e-6))).astype(np.float32)


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations run and how strong they are; `Augmentation.off()` disables all."""

    flips: bool = True  # random 90-degree rotation and horizontal flip
    stain: float = 0.1  # HED jitter strength s in optical density (0 = off)
    # Off by default: at 0.2 it cost 0.06 of unshifted accuracy and did not raise the mean over the shifts of
    # benchmarks/robustness.py (docs/plip.md); colour is part of what tells these classes apart here.
    stain_vectors: float = 0.0  # hue change of the H and E stain vectors, per component (0 = off)
    # Another lab's slides carry more or less of each dye (a tissue section's thickness, staining time): the
    # haematoxylin and eosin densities are each multiplied by a log-uniform factor in [1 / a, a] (1 = off).
    stain_amount: float = 1.0
    colour: float = 0.1  # brightness / contrast / saturation jitter, each a factor in U(1 - c, 1 + c)
    # A magnification change on 60% of views, up to 4x either way: against 50% up to 2x, PLIP's zero-shot
    # accuracy over dev views zoomed 1/3x-4x rose from 0.753 to 0.811 (oral at 1/3x: 0.28 -> 0.69) with the
    # unshifted accuracy unchanged (docs/magnification.md).
    zoom: float = 0.6  # probability of a random scale (magnification) change
    max_zoom: float = 4.0  # the scale is log-uniform in [1 / max_zoom, max_zoom]
    resolution: float = 0.1  # probability of a 2-4x down- and up-sampling (resolution jitter)
    hue: float = 0.0  # hue turned by U(-h, h) of the colour circle (0 = off; 0.5 = any hue)
    grayscale: float = 0.0  # probability of a grey view
    # Probability of a view in a stain between its dataset's and another training dataset's (needs a
    # StainBank of two or more datasets; processing/stain_mix.py).
    stain_mix: float = 0.0

    def __post_init__(self) -> None:
        for name in ("stain", "stain_vectors", "colour", "zoom", "resolution", "grayscale", "stain_mix"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"augmentation '{name}' must be in [0, 1], got {value}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augmentation 'hue' must be in [0, 0.5], got {self.hue}")
        if not 1 <= self.stain_amount <= 4:
            raise ValueError(f"augmentation 'stain_amount' must be in [1, 4], got {self.stain_amount}")
        if not 1 <= self.max_zoom <= 8:
            raise ValueError(f"augmentation 'max_zoom' must be in [1, 8], got {self.max_zoom}")

    @classmethod
    def off(cls) -> Augmentation:
        return cls(
            flips=False,
            stain=0.0,
            stain_vectors=0.0,
            stain_amount=1.0,
            colour=0.0,
            zoom=0.0,
            max_zoom=1.0,
            resolution=0.0,
            hue=0.0,
            grayscale=0.0,
            stain_mix=0.0,
        )

    @classmethod
    def from_dict(cls, data: dict | None, source: str = "augmentation") -> Augmentation:
        """From a recipe mapping; unknown keys are an error naming them."""
        data = dict(data or {})
        known = set(asdict(cls()))
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def hed_jitter(
    pixels: np.ndarray,
    rng: random.Random,
    strength: float,
    vectors: float = 0.0,
    restain: np.ndarray | None = None,
    amount: float = 1.0,
) -> np.ndarray:
    """Scale and shift each stain's optical density (H, E, DAB) of a uint8 (H, W, 3) image, and with
    `vectors` > 0 mix them back with moved H and E stain vectors; float32 out. `restain`, a 3x3 optical-
    density map (`StainBank.mixing_matrix`), is applied first. `amount` > 1 also multiplies the H and E
    densities by log-uniform factors in [1 / amount, amount].

    Unmixing, jitter and re-mixing are linear in optical density, so they fold into one 3x3 matrix and a
    bias: density' = density @ restain @ (unmix * alpha) @ mix' + beta @ mix'.
    """
    alpha = np.array([rng.uniform(1 - strength, 1 + strength) for _ in range(3)])
    beta = np.array([rng.uniform(-strength, strength) for _ in range(3)])
    if amount > 1:  # drawn only when asked: the recipes without it keep their random stream
        spread = math.log(amount)
        alpha[:2] *= np.exp([rng.uniform(-spread, spread) for _ in range(2)])
    mix = _RGB_FROM_HED
    if vectors:
        moved = mix[:2] + np.array([[rng.uniform(-vectors, vectors) for _ in range(3)] for _ in range(2)])
        moved = np.maximum(moved, 0.01)  # a dye absorbs, never emits: densities stay positive
        mix = np.vstack([moved / np.linalg.norm(moved, axis=1, keepdims=True), mix[2:]])
    matrix = (_HED_FROM_RGB * alpha) @ mix
    if restain is not None:
        matrix = restain @ matrix
    matrix = matrix.astype(np.float32)
    bias = (beta @ mix).astype(np.float32)
    return map_densities(pixels, matrix, bias)


def map_densities(pixels: np.ndarray, matrix: np.ndarray, bias: np.ndarray | float = 0.0) -> np.ndarray:
    """A uint8 (H, W, 3) image with its optical densities mapped, density' = density @ matrix + bias (a 3x3
    float32 matrix, e.g. `stain_mix.transfer_matrix`); float32 out, in [0, 255]."""
    density = _OPTICAL_DENSITY[pixels]  # (H, W, 3) float32, a table lookup per uint8 value
    # 255 * exp(-(d @ M + b)) = exp(ln 255 - d @ M - b): one pass less over the image
    shift = np.float32(math.log(255.0)) - np.asarray(bias, np.float32)
    rgb = np.exp(shift - (density.reshape(-1, 3) @ matrix).reshape(density.shape))
    return np.clip(rgb, 0, 255, out=rgb)


def rotate_hue(pixels: np.ndarray, turn: float) -> np.ndarray:
    """Float (H, W, 3) RGB with its hue turned by `turn` of the colour circle: a rotation about the grey axis
    (1, 1, 1), so greys, and each pixel's mean over channels, stay as they are."""
    angle = 2 * math.pi * turn
    axis = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = (
        math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(axis, axis)
    )
    return pixels @ rotation.T.astype(np.float32)


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)))
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def rescale(pixels: np.ndarray, rng: random.Random, scale: float) -> np.ndarray:
    """The tile seen at `scale` x its magnification, same size: > 1 a random crop resized up, < 1 the tile
    shrunk and continued by mirroring around it."""
    height, width = pixels.shape[:2]
    if scale >= 1:
        crop_h, crop_w = max(1, round(height / scale)), max(1, round(width / scale))
        top, left = rng.randrange(height - crop_h + 1), rng.randrange(width - crop_w + 1)
        return _resize(pixels[top : top + crop_h, left : left + crop_w], width, height)
    # Shrinking first and mirroring the small tile gives the view of mirroring first and shrinking the large
    # canvas (up to the resampling at the seams) at a fraction of the cost: 0.5 ms against 3.0 at 1/2.5x.
    small_h, small_w = max(1, round(height * scale)), max(1, round(width * scale))
    pad_h, pad_w = height - small_h, width - small_w
    top, left = rng.randrange(pad_h + 1), rng.randrange(pad_w + 1)
    small = _resize(pixels, small_w, small_h)
    return np.pad(small, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="symmetric")


def degrade_resolution(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Down-sample by `factor` and back up: the detail a lower-resolution scanner would lose."""
    height, width = pixels.shape[:2]
    small = _resize(pixels, max(1, round(width / factor)), max(1, round(height / factor)))
    return _resize(small, width, height)


def augment(
    pixels: np.ndarray,
    rng: random.Random,
    config: Augmentation,
    stains: StainBank | None = None,
    dataset: str | None = None,
) -> np.ndarray:
    """One random view of a uint8 (H, W, 3) tile of `dataset`; returns float32 (H, W, 3) in [0, 255], same
    size. `stains` (the training datasets' stains) is needed for `config.stain_mix`."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"augment expects a uint8 (H, W, 3) image, got {pixels.dtype} {pixels.shape}")
    array = pixels
    if config.zoom and rng.random() < config.zoom:
        scale = math.exp(rng.uniform(-math.log(config.max_zoom), math.log(config.max_zoom)))
        array = rescale(array, rng, scale)
    if config.resolution and rng.random() < config.resolution:
        array = degrade_resolution(array, rng.uniform(2.0, 4.0))
    if config.flips:
        array = np.rot90(array, k=rng.randrange(4))
        if rng.random() < 0.5:
            array = array[:, ::-1]
    restain = None
    if config.stain_mix and stains is not None and rng.random() < config.stain_mix:
        restain = stains.mixing_matrix(dataset, rng)
    if config.stain or config.stain_vectors or config.stain_amount > 1 or restain is not None:
        x = hed_jitter(array, rng, config.stain, config.stain_vectors, restain, config.stain_amount)
    else:
        x = array.astype(np.float32)
    if config.colour:
        c = config.colour
        brightness, contrast, saturation = (rng.uniform(1 - c, 1 + c) for _ in range(3))
        x = colour_jitter(x, brightness, contrast, saturation)
    if config.hue:
        x = rotate_hue(x, rng.uniform(-config.hue, config.hue))
    if config.grayscale and rng.random() < config.grayscale:
        x = np.repeat(_channel_mean(x), 3, axis=2)
    return np.clip(x, 0, 255, out=x)  # x is this function's own float32 array


def _channel_mean(x: np.ndarray) -> np.ndarray:
    """(H, W, 1) mean over the colour channels: numpy's mean over a last axis of 3 is 15x slower."""
    return ((x[..., 0] + x[..., 1] + x[..., 2]) / 3)[..., None]


def colour_jitter(x: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Brightness (x * b), then contrast about the mean (m + c (x - m)), then saturation about each pixel's
    grey (g + s (x - g)) of float32 RGB, folded into one pass: the three maps are affine, and each pixel's
    grey and the image's mean move with them, so the result is b (cs x + c (1 - s) g + (1 - c) m) with g
    and m those of the input."""
    gray = _channel_mean(x)
    scale = brightness * contrast
    out = x * np.float32(scale * saturation)
    out += gray * np.float32(scale * (1 - saturation))
    out += np.float32(brightness * (1 - contrast) * float(gray.mean()))
    return out
