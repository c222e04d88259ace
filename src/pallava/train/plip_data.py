"""PLIP training data: caption JSONL or labelled manifests, an in-memory image cache, light augmentation.

Labelled images get a fresh caption from `prompts.CAPTION_TEMPLATES` each epoch, and every image a fresh
augmented view (`processing.augment`: stain, magnification, orientation). Every sample carries match
keys (image key, text key): images of one class share the text key, as do identical captions, so the
losses treat them as positives and never as negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pallava.data.datasets import merged_label_map as dataset_label_map
from pallava.data.datasets import parse_data_args
from pallava.data.importers.manifest import holds_labelled_images, read_labelled_images
from pallava.data.io import iter_jsonl
from pallava.data.labels import LabelMap
from pallava.data.records import LabelledImage
from pallava.models.plip.prompts import caption_for
from pallava.processing.augment import Augmentation, augment
from pallava.processing.image import letterbox, normalize
from pallava.processing.loading import load_image
from pallava.processing.stain_mix import StainBank
from pallava.processing.stain_norm import stain_normalize


@dataclass(frozen=True)
class PlipSample:
    """One training pair: an image path and a caption, or a label to caption from."""

    image: str
    caption: str | None
    label: str | None
    image_key: int
    text_key: int
    dataset: str | None = None  # provenance: the dataset it came from


def stable_key(text: str) -> int:
    """A 63-bit key that is the same in every process and run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def normalise_caption(caption: str) -> str:
    """Lower-cased, whitespace-collapsed caption: the identity used for duplicate captions."""
    return " ".join(caption.lower().split())


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
        dataset = (record.get("meta") or {}).get("dataset")
        samples.append(
            PlipSample(
                str(image),
                caption,
                label if isinstance(label, str) and label else None,
                stable_key(f"image:{image}"),
                stable_key(text),
                dataset if isinstance(dataset, str) else None,
            )
        )
    if not samples:
        raise ValueError(f"{path}: no caption records" + (f" for split '{split}'" if split else ""))
    return samples


def read_plip_data(
    path: str | Path | list[str | Path], split: str | None, label_map: str | None = None
) -> tuple[list[PlipSample], LabelMap | None]:
    """Samples from caption JSONL files and/or labelled manifest CSVs (one path, several, or a YAML dataset
    list), each tagged with its dataset; with manifests, the label map covering their labels."""
    paths = path if isinstance(path, list | tuple) else [path]
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"PLIP data not found: {', '.join(missing)}")
    datasets = parse_data_args([str(p) for p in paths])
    samples: list[PlipSample] = []
    labelled: list[LabelledImage] = []
    for spec in datasets.datasets:
        file = Path(spec.path)
        if file.suffix.lower() == ".jsonl":
            samples += [
                s if s.dataset else dataclasses.replace(s, dataset=spec.name)
                for s in read_caption_jsonl(file, split)
            ]
        elif holds_labelled_images(file):
            for item in read_labelled_images(file, split):
                item.dataset = spec.name
                labelled.append(item)
        else:
            raise ValueError(
                f"{file}: expected a caption .jsonl, a manifest .csv or an image folder "
                "(root/<class>/<image>)"
            )
    if not labelled:
        return samples, _caption_label_map(samples, label_map)
    labels = dataset_label_map(datasets, labelled, label_map)
    samples += [
        PlipSample(
            item.path,
            None,
            item.label,
            stable_key(f"image:{item.path}"),
            stable_key(f"label:{item.label}"),
            item.dataset,
        )
        for item in labelled
    ]
    return samples, labels


def _caption_label_map(samples: list[PlipSample], spec: str | None) -> LabelMap | None:
    """The label map of captions generated from class labels (`meta.label`), saved with the model so that
    zero-shot and slide maps know its classes; None for captions of a real corpus."""
    labels = {s.label for s in samples if s.label is not None}
    if not labels:
        return None
    try:
        return LabelMap.resolve(spec, labels)
    except ValueError:
        if spec:
            raise
        return None


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
        augmentation: Augmentation | None = None,
        stains: StainBank | None = None,
        stain_normalize: str | None = None,
    ):
        if any(s.caption is None for s in samples) and label_map is None:
            raise ValueError("PlipDataset: labelled samples need a label map to caption them")
        self.samples, self.image_size, self.label_map = samples, image_size, label_map
        self.train, self.seed, self.epoch = train, seed, 0
        self.augmentation = augmentation or Augmentation()
        self.stains = stains  # the datasets' stains, for augmentation.stain_mix
        # e.g. "macenko": each image normalised once, before it is cached and augmented (normalising every
        # augmented view instead would cost a stain estimate per view and undo the stain jitter)
        self.stain_normalize = stain_normalize
        self._cache: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Captions and augmentations are a function of (seed, epoch, index): reproducible and resumable."""
        self.epoch = epoch

    def _pixels(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index]
        image = stain_normalize(load_image(self.samples[index].image), self.stain_normalize)
        return np.asarray(letterbox(image, self.image_size, self.image_size))

    def cache_images(self, progress: bool = True) -> None:
        """Decode every image once (uint8, S x S x 3); later epochs skip the JPEG decoding. A sample repeated
        by dataset balancing shares its image's array."""
        decoded: dict[str, np.ndarray] = {}
        cache = []
        for index in tqdm(range(len(self)), desc="decoding images", disable=not progress):
            path = self.samples[index].image
            if path not in decoded:
                decoded[path] = self._pixels(index)
            cache.append(decoded[path])
        self._cache = cache

    def __getitem__(self, index: int) -> dict[str, object]:
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        pixels = self._pixels(index)
        if self.train:
            pixels = augment(pixels, rng, self.augmentation, self.stains, sample.dataset)
        caption = sample.caption
        if caption is None:
            caption = caption_for(self.label_map[sample.label], rng)
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(normalize(pixels))),
            "caption": caption,
            "match_keys": torch.tensor([sample.image_key, sample.text_key], dtype=torch.long),
        }


class PlipCollator:
    """Stacks images and keys; tokenizes captions (padded to the longest, truncated to `max_length`).

    With `backbone` (a tower's `PretrainedStem`), the images leave as the maps of its frozen steps: run in the
    loader worker, the frozen half of the vision tower then works on one core while the steps train the rest
    on the other (`backbone_in_loader` in the PLIP recipe). The tower takes the maps in place of pixels.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, backbone=None):
        self.tokenizer, self.max_length, self.backbone = tokenizer, max_length, backbone

    def __call__(self, batch: list[dict[str, object]]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            [item["caption"] for item in batch],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        pixels = torch.stack([item["pixel_values"] for item in batch])
        return {
            "pixel_values": pixels if self.backbone is None else self.backbone.frozen_maps(pixels),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "match_keys": torch.stack([item["match_keys"] for item in batch]),
        }
