"""PLIP training data: caption JSONL or labelled manifests, an in-memory image cache, light augmentation.

Labelled images get a fresh caption from `prompts.CAPTION_TEMPLATES` each epoch. Every sample carries match
keys (image key, text key): images of one class share the text key, as do identical captions, so the
losses treat them as positives and never as negatives.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pallava.data.importers.manifest import read_manifest
from pallava.data.io import iter_jsonl
from pallava.data.labels import LabelMap
from pallava.models.plip.prompts import caption_for
from pallava.processing.image import letterbox, load_image, normalize


@dataclass(frozen=True)
class PlipSample:
    """One training pair: an image path and a caption, or a label to caption from."""

    image: str
    caption: str | None
    label: str | None
    image_key: int
    text_key: int


def stable_key(text: str) -> int:
    """A 63-bit key that is the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def normalise_caption(caption: str) -> str:
    """Lower-cased, whitespace-collapsed caption: the identity used for duplicate captions."""
    return " ".join(caption.lower().split())


def label_map_for(labels: set[str], spec: str | None, source: str) -> LabelMap:
    """`spec` is a built-in map name or a JSON/YAML file; None picks the built-in map covering `labels`."""
    if spec is None:
        for name in LabelMap.builtin_names():
            candidate = LabelMap.builtin(name)
            if labels <= set(candidate):
                return candidate
        raise ValueError(
            f"{source}: no built-in label map covers labels {sorted(labels)}; pass --label-map FILE"
        )
    label_map = LabelMap.builtin(spec) if spec in LabelMap.builtin_names() else LabelMap.from_file(spec)
    missing = sorted(labels - set(label_map))
    if missing:
        raise ValueError(
            f"{source}: labels {missing} are not in the label map {spec} ({', '.join(label_map)})"
        )
    return label_map


def read_caption_jsonl(path: Path, split: str | None) -> list[PlipSample]:
    """`{image, caption[, split, meta]}` per line (CaptionPair records); image paths are relative to the file.

    The split comes from `split` or `meta.split`; records without one are always kept.
    """
    samples = []
    for number, record in iter_jsonl(path):
        for field in ("image", "caption"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise ValueError(f"{path}: line {number}: field '{field}' must be a non-empty string")
        record_split = record.get("split") or (record.get("meta") or {}).get("split")
        if split is not None and record_split is not None and record_split != split:
            continue
        image = (path.parent / record["image"]).resolve()
        if not image.is_file():
            raise ValueError(f"{path}: line {number}: field 'image': file not found: {image}")
        caption = record["caption"].strip()
        # Captions generated from a class label (meta.label) describe the class: they match by class.
        label = (record.get("meta") or {}).get("label")
        text = f"label:{label}" if isinstance(label, str) and label else f"text:{normalise_caption(caption)}"
        samples.append(PlipSample(str(image), caption, None, stable_key(f"image:{image}"), stable_key(text)))
    if not samples:
        raise ValueError(f"{path}: no caption records" + (f" for split '{split}'" if split else ""))
    return samples


def read_plip_data(
    path: str | Path, split: str | None, label_map: str | None = None
) -> tuple[list[PlipSample], LabelMap | None]:
    """Samples from a caption JSONL or a labelled manifest CSV (with its label map)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"PLIP data not found: {path}")
    if path.suffix.lower() == ".jsonl":
        return read_caption_jsonl(path, split), None
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: expected a caption .jsonl or a manifest .csv")
    items = read_manifest(path, split)
    labels = label_map_for({item.label for item in items}, label_map, str(path))
    samples = [
        PlipSample(
            item.path, None, item.label, stable_key(f"image:{item.path}"), stable_key(f"label:{item.label}")
        )
        for item in items
    ]
    return samples, labels


def augment(array: np.ndarray, rng: random.Random, crop_scale: float = 1.0) -> np.ndarray:
    """Random 90-degree rotation, flip and small brightness/contrast/saturation jitter of a square HxWx3
    image.

    With `crop_scale` < 1, first a random square crop (side `crop_scale`..1 of the image) resized back: zoom.
    """
    if crop_scale < 1.0:
        size = array.shape[0]
        side = round(size * rng.uniform(crop_scale, 1.0))
        top, left = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
        crop = Image.fromarray(np.ascontiguousarray(array[top : top + side, left : left + side]))
        array = np.asarray(crop.resize((size, size), Image.BILINEAR))
    array = np.rot90(array, k=rng.randrange(4))
    if rng.random() < 0.5:
        array = array[:, ::-1]
    x = array.astype(np.float32) * rng.uniform(0.9, 1.1)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.9, 1.1) + mean
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * rng.uniform(0.9, 1.1) + gray
    return np.clip(x, 0, 255)


class PlipDataset(Dataset):
    """Images (letterboxed to the model size, cached in memory on request) with their captions and match
    keys."""

    def __init__(
        self,
        samples: list[PlipSample],
        image_size: int,
        label_map: LabelMap | None = None,
        train: bool = True,
        seed: int = 0,
        crop_scale: float = 1.0,
    ):
        if any(s.caption is None for s in samples) and label_map is None:
            raise ValueError("PlipDataset: labelled samples need a label map to caption them")
        self.samples, self.image_size, self.label_map = samples, image_size, label_map
        self.train, self.seed, self.epoch, self.crop_scale = train, seed, 0, crop_scale
        self._cache: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Captions and augmentations are a function of (seed, epoch, index): reproducible and resumable."""
        self.epoch = epoch

    def _pixels(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index]
        image = load_image(self.samples[index].image)
        return np.asarray(letterbox(image, self.image_size, self.image_size))

    def cache_images(self, progress: bool = True) -> None:
        """Decode every image once (uint8, S x S x 3); later epochs skip the JPEG decoding."""
        self._cache = [
            self._pixels(i) for i in tqdm(range(len(self)), desc="decoding images", disable=not progress)
        ]

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        pixels = self._pixels(index)
        if self.train:
            pixels = augment(pixels, rng, self.crop_scale)
        caption = sample.caption
        if caption is None:
            caption = caption_for(self.label_map[sample.label], rng)
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(normalize(pixels))),
            "caption": caption,
            "match_keys": torch.tensor([sample.image_key, sample.text_key], dtype=torch.long),
        }


class PlipCollator:
    """Stacks images and keys; tokenizes captions (padded to the longest, truncated to `max_length`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: list[dict[str, object]]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [item["caption"] for item in batch],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "match_keys": torch.stack([item["match_keys"] for item in batch]),
        }
