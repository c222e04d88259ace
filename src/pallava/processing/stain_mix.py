"""Stain mixing across training datasets: a view of one dataset's image in another dataset's stain.

When every organ of a training set comes from one lab, the colour of the stain tells the organ, and a model
learns that shortcut: a lung tile re-stained like another lab's slide is then read as oral mucosa
(docs/robustness.md). Stain mixing breaks the link between dataset and colour while keeping the colour
differences inside a dataset (which may carry the class): each dataset's H&E stain is estimated once from a
sample of its training images (Macenko et al., 2009, via torchstain: the two stain vectors in optical density
and the 99th percentile of each stain's concentration), and a mixed view is the image unmixed with its own
dataset's stain and re-mixed with a stain drawn on the line between its own and another training dataset's.
Whatever does not project on the two stains (the residual) is kept, so nothing of the image is lost; white
stays white (optical density 0 maps to 0). The map is linear in optical density, one 3x3 matrix, and
folds into the HED jitter of `processing.augment`.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

Source = TypeVar("Source")


@dataclass(frozen=True)
class Stain:
    """A dataset's H&E stain: unit haematoxylin and eosin vectors in optical density, rows of `vectors`
    (2, 3), and the 99th percentile of each stain's concentration, `scale` (2,)."""

    vectors: np.ndarray
    scale: np.ndarray

    def to_dict(self) -> dict:
        return {"vectors": np.round(self.vectors, 4).tolist(), "scale": np.round(self.scale, 4).tolist()}


def estimate_stain(images: Iterable[np.ndarray]) -> Stain:
    """The Macenko stain of uint8 (H, W, 3) images taken together (their stained pixels pooled).

    Raises ValueError when the images hold too little stained tissue to estimate two stains.
    """
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    pixels = [np.asarray(image, dtype=np.uint8).reshape(-1, 3) for image in images]
    if not pixels:
        raise ValueError("estimate_stain: no images")
    normalizer = NumpyMacenkoNormalizer()
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # empty or degenerate pixel sets: raised below
            normalizer.fit(np.concatenate(pixels)[None])
    except (np.linalg.LinAlgError, ValueError, IndexError) as error:
        raise ValueError(
            f"estimate_stain: too little stained tissue to estimate H&E stains ({error})"
        ) from None
    vectors, scale = normalizer.HERef.T.astype(np.float64), normalizer.maxCRef.astype(np.float64)
    if not (np.isfinite(vectors).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("estimate_stain: too little stained tissue to estimate H&E stains")
    return Stain(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), scale)


class StainBank:
    """The stains of a training set's datasets, and the random stain-mixing map of a view."""

    def __init__(self, stains: Mapping[str, Stain]):
        self.stains = dict(sorted(stains.items()))

    @classmethod
    def estimate(
        cls,
        items: Sequence[tuple[str | None, Source]],
        load: Callable[[Source], np.ndarray] | None = None,
        per_dataset: int = 32,
        seed: int = 0,
    ) -> StainBank:
        """From (dataset, image source) pairs: `per_dataset` distinct images of each dataset, drawn with
        `seed`, loaded by `load` (uint8 H x W x 3; default: any image source, shrunk to 256 px at most).
        Items without a dataset are pooled as one, "unnamed". Sources must be hashable (paths or bytes)."""
        load = load or _thumbnail
        by_dataset: dict[str, dict[Source, None]] = {}  # insertion-ordered sets (sources are hashable)
        for dataset, source in items:
            by_dataset.setdefault(dataset or "unnamed", {})[source] = None
        stains = {}
        for dataset, group in sorted(by_dataset.items()):
            # the images with the smallest seeded hashes: the choice depends on which images a dataset holds,
            # not on their order, and an image more or less changes at most one of them, so both assistant
            # stages (whose records differ slightly) estimate the same stains and share their cached views
            chosen = sorted(group, key=lambda source: _draw_key(source, seed))[:per_dataset]
            try:
                stains[dataset] = estimate_stain(load(source) for source in chosen)
            except ValueError as error:
                raise ValueError(f"stain mixing: dataset {dataset!r}: {error}") from None
        return cls(stains)

    @property
    def mixes(self) -> bool:
        """Whether there is anything to mix: two or more datasets."""
        return len(self.stains) > 1

    def fingerprint(self) -> str:
        """A short hash of every stain: part of a cached view's key."""
        text = json.dumps({name: stain.to_dict() for name, stain in self.stains.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def summary(self) -> str:
        """One line for a training log: the stains, or why nothing is mixed."""
        if not self.mixes:
            return f"stain mixing does nothing: one dataset ({', '.join(self.stains)}), no other stain to mix"
        rounded = {name: stain.to_dict() for name, stain in self.stains.items()}
        parts = [
            f"{name} H {values['vectors'][0]} E {values['vectors'][1]} scale {values['scale']}"
            for name, values in rounded.items()
        ]
        return "stain mixing between: " + "; ".join(parts)

    def mixing_matrix(self, dataset: str | None, rng: random.Random) -> np.ndarray | None:
        """The 3x3 optical-density map (row vectors: density' = density @ M) that re-stains an image of
        `dataset` with a stain a random way towards another dataset's; None when there is no other dataset
        (or the image's dataset is not in the bank)."""
        own = self.stains.get(dataset or "unnamed")
        others = [name for name in self.stains if name != (dataset or "unnamed")]
        if own is None or not others:
            return None
        other = self.stains[rng.choice(others)]
        share = rng.random()
        vectors = (1 - share) * own.vectors + share * other.vectors
        blend = Stain(
            vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
            (1 - share) * own.scale + share * other.scale,
        )
        return transfer_matrix(own, blend)


def transfer_matrix(source: Stain, target: Stain) -> np.ndarray:
    """The 3x3 optical-density map (density' = density @ M) from `source`'s stain to `target`'s: the H and E
    concentrations c = density @ pinv(source.vectors), rescaled by target.scale / source.scale and mixed
    with target's vectors; the residual (density - c @ source.vectors) kept as it is."""
    unmix = np.linalg.pinv(source.vectors)  # (3, 2)
    return np.eye(3) + unmix @ ((target.scale / source.scale)[:, None] * target.vectors - source.vectors)


def _draw_key(source, seed: int) -> str:
    data = source if isinstance(source, bytes) else str(source).encode()
    return hashlib.sha256(f"{seed}:".encode() + data).hexdigest()


def _thumbnail(source) -> np.ndarray:
    from pallava.processing.loading import load_image

    image = load_image(source)
    image.thumbnail((256, 256))
    return np.asarray(image)
