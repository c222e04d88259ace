"""Training samples and batches: conversations from files or labelled manifests, a resumable order.

The order of an epoch is a seeded permutation of the whole dataset, identical on every process. One
optimizer step consumes a *global batch* of `batch_size x processes x grad_accum` samples; micro-step
`j` of process `r` takes the `r`-th slice of the `j`-th part. So the same recipe sees the same global
batches whatever the number of processes, and a run resumed at step `s` of an epoch simply starts at
global batch `s` — the data position is `(epoch, step in epoch)`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pallava.data.builders import (
    captions_from_labels,
    stage1_conversations,
    stage2_conversations,
    vqa_from_labels,
)
from pallava.data.datasets import DatasetList, balance, balance_labels, parse_data_args, read_labelled
from pallava.data.datasets import merged_label_map as dataset_label_map
from pallava.data.importers.conversations import read_llava
from pallava.data.records import ANSWER_TYPES, Conversation
from pallava.data.shards import iter_shards, list_shards
from pallava.processing.augment import Augmentation, augment
from pallava.processing.loading import ImageSource, load_image
from pallava.processing.processor import IGNORE_INDEX, PaLlavaProcessor
from pallava.processing.stain_mix import StainBank
from pallava.train.config import AugmentSection, DataSection
from pallava.train.feature_cache import FeatureCache
from pallava.train.packing import Pack, answers_in, encode_rows, sample_row


@dataclass
class Sample:
    """One training conversation (LLaVA turns) with at most one image, by path or by bytes."""

    id: str
    conversation: list[dict[str, str]]
    image: str | None = None
    image_bytes: bytes | None = None
    answer_type: str | None = None
    dataset: str | None = None  # provenance: the dataset it came from
    label: str | None = None  # its image's class, where the record names one (`meta.label`)
    view: int = 0  # which view of its image it sees: 0 the original, k > 0 augmented view k
    pack: Pack | None = None  # several questions about this image in one row (`train.packing`)

    @property
    def image_source(self) -> str | bytes | None:
        return self.image_bytes if self.image_bytes is not None else self.image

    def read_image_bytes(self) -> bytes:
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image is None:
            raise ValueError(f"sample {self.id}: has no image")
        try:
            return Path(self.image).read_bytes()
        except OSError as error:
            raise ValueError(
                f"sample {self.id}: field 'image': cannot read {self.image} ({error.strerror})"
            ) from None


def _from_conversation(conversation: Conversation, image_bytes: bytes | None = None) -> Sample:
    return Sample(
        id=conversation.id,
        conversation=conversation.conversations,
        image=conversation.image,
        image_bytes=image_bytes,
        answer_type=conversation.meta.get("answer_type"),
        dataset=conversation.meta.get("dataset"),
        label=conversation.meta.get("label"),
    )


def _manifest_samples(section: DataSection, stage: str, datasets: DatasetList) -> list[Sample]:
    items = read_labelled(datasets, section.split)
    label_map = dataset_label_map(datasets, items, section.label_map)
    if stage == "align":
        conversations = stage1_conversations(
            captions_from_labels(items, label_map, section.seed), section.seed
        )
    else:
        conversations = stage2_conversations(vqa_from_labels(items, label_map, section.seed))
    return [_from_conversation(c) for c in conversations]


def _conversation_samples(section: DataSection, path: Path) -> list[Sample]:
    if path.is_dir() or path.suffix == ".parquet":
        root = Path(section.image_root) if section.image_root else (path if path.is_dir() else path.parent)
        samples = []
        for record in iter_shards(list_shards(path), with_images=True):
            image_bytes = record.pop("image_bytes", None)
            try:
                conversation = Conversation.from_dict(record)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
            if (
                conversation.image is not None
                and image_bytes is None
                and not Path(conversation.image).is_absolute()
            ):
                conversation.image = str(root / conversation.image)
            samples.append(_from_conversation(conversation, image_bytes))
        return samples
    root = section.image_root if section.image_root else path.parent
    return [_from_conversation(c) for c in read_llava(path, root)]


def load_samples(section: DataSection, stage: str) -> list[Sample]:
    """The stage's samples: manifests are turned into captions (align) or VQA (instruct).

    With several datasets (a list of paths or a YAML dataset list) every sample keeps its dataset's name
    and the smaller datasets are repeated as `data.balance` / `data.weights` say.
    """
    if section.type_weights is not None and section.limit is None:
        raise ValueError("data.type_weights weighs the answer types in the data.limit subset: set data.limit")
    paths = section.path if isinstance(section.path, list) else [section.path]
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"data.path: {path} not found")
    datasets = parse_data_args(paths, section.balance)
    fmt = section.format
    if fmt == "auto":
        kinds = {Path(spec.path).suffix.lower() == ".csv" for spec in datasets.datasets}
        if len(kinds) > 1:
            raise ValueError("data.path: mixes manifests and conversation files; train on one kind at a time")
        fmt = "manifest" if kinds == {True} else "conversations"
    if fmt == "manifest":
        samples = _manifest_samples(section, stage, datasets)
    else:
        samples = []
        for spec in datasets.datasets:
            loaded = _conversation_samples(section, Path(spec.path))
            for sample in loaded:
                sample.dataset = sample.dataset or spec.name
            samples += loaded
    if section.answer_types:  # generated questions and conversation files alike carry their answer type
        _check_answer_types("data.answer_types", section.answer_types)
        samples = [sample for sample in samples if sample.answer_type in section.answer_types]
    if section.limit is not None and section.limit < len(samples):
        keep = subset_indices(
            [s.answer_type for s in samples], section.limit, section.seed, section.type_weights
        )
        samples = [samples[i] for i in keep]
    if not samples:
        raise ValueError(f"data.path: {', '.join(map(str, paths))} holds no training samples")
    if section.balance_labels:
        samples = [samples[i] for i in balance_labels([(s.dataset, s.label) for s in samples], section.seed)]
    weights = {**datasets.weights, **(section.weights or {})}
    return [
        samples[i] for i in balance([s.dataset for s in samples], datasets.balance, weights, section.seed)
    ]


def _check_answer_types(field: str, names) -> None:
    unknown = set(names) - set(ANSWER_TYPES)
    if unknown:
        raise ValueError(f"{field}: unknown {sorted(unknown)}; expected some of {list(ANSWER_TYPES)}")


def subset_indices(
    answer_types: Sequence[str | None], limit: int, seed: int, type_weights: dict | None = None
) -> list[int]:
    """A seeded subset of `limit` sample indices, in order. Uniform, or with `type_weights` (answer type ->
    weight, 1 for a type not named) drawn without replacement in proportion to the weights
    (Efraimidis-Spirakis keys u^(1/w)): a mix can favour the question forms that are slow to learn."""
    rng = random.Random(seed)
    if not type_weights:
        return sorted(rng.sample(range(len(answer_types)), limit))
    _check_answer_types("data.type_weights", type_weights)
    weights = [float(type_weights.get(kind, 1.0)) for kind in answer_types]
    if any(w <= 0 for w in weights):
        raise ValueError(f"data.type_weights: weights must be positive, got {type_weights}")
    keys = [rng.random() ** (1.0 / w) for w in weights]
    return sorted(sorted(range(len(keys)), key=keys.__getitem__, reverse=True)[:limit])


# --- augmented views ------------------------------------------------------------------------------
def assign_views(samples: Sequence[Sample], views: int, seed: int) -> None:
    """Give each sample with an image one of its image's `views + 1` versions, by a hash of its id."""
    for sample in samples:
        if sample.image_source is not None and views > 0:
            digest = hashlib.blake2b(f"{seed}:{sample.id}".encode(), digest_size=4).digest()
            sample.view = int.from_bytes(digest, "big") % (views + 1)


@dataclass(frozen=True)
class ViewMaker:
    """How a training run makes its augmented views: the settings, the seed and, for stain mixing, the
    training datasets' stains (`processing.stain_mix`)."""

    section: AugmentSection
    seed: int
    stains: StainBank | None = None

    @classmethod
    def for_samples(cls, section: AugmentSection, seed: int, samples: Sequence[Sample]) -> ViewMaker:
        """With `stain_mix` on, each dataset's stain is estimated from its training images."""
        config = Augmentation.from_dict(section.image, source="augment.image")
        stains = None
        if section.views and config.stain_mix:
            pairs = [(s.dataset, s.image_source) for s in samples if s.image_source is not None]
            stains = StainBank.estimate(pairs, seed=seed)
        return cls(section, seed, stains)

    @property
    def tag(self) -> str:
        """Part of a view's cache key: every setting that changes the pixels of a view."""
        settings = {"seed": self.seed, "large": self.section.large, "image": self.section.image}
        if self.stains is not None:
            settings["stains"] = self.stains.fingerprint()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]

    def view(self, source: ImageSource, view: int, dataset: str | None = None) -> Image.Image:
        """Augmented view `view` (>= 1) of an image of `dataset`: a function of (image, view, seed,
        settings, stains) only."""
        image = load_image(source)
        rng = random.Random(f"{self.seed}:{view}:{hashlib.sha256(image.tobytes()).hexdigest()[:16]}")
        config = Augmentation.from_dict(self.section.image, source="augment.image")
        pixels = augment(np.asarray(image), rng, config, self.stains, dataset)
        out = Image.fromarray(pixels.round().astype(np.uint8))
        if self.section.large and rng.random() < self.section.large:  # larger: tiled, so higher-power tiles
            factor = rng.uniform(2.0, 3.0)
            out = out.resize((round(out.width * factor), round(out.height * factor)), Image.BICUBIC)
        return out


# --- order ------------------------------------------------------------------------------------------
def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch (the same on every process)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def global_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    return batch_size * world_size * grad_accum


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch (the last incomplete global batch is dropped)."""
    size = global_batch_size(batch_size, world_size, grad_accum)
    if num_samples < size:
        raise ValueError(
            f"{num_samples} samples are fewer than one global batch of {size} "
            f"(batch_size {batch_size} x {world_size} process(es) x grad_accum {grad_accum})"
        )
    return num_samples // size


def micro_batches(
    order: Sequence[int], step: int, batch_size: int, world_size: int, grad_accum: int, rank: int
) -> list[list[int]]:
    """The `grad_accum` micro-batches (sample indices) of process `rank` for optimizer step `step` of an
    epoch."""
    size = global_batch_size(batch_size, world_size, grad_accum)
    chunk = list(order[step * size : (step + 1) * size])
    per_micro = batch_size * world_size
    return [
        chunk[j * per_micro + rank * batch_size : j * per_micro + (rank + 1) * batch_size]
        for j in range(grad_accum)
    ]


# --- batches ----------------------------------------------------------------------------------------
class Collator:
    """Sample indices -> model inputs; with a feature cache, cached crop features replace the pixels."""

    def __init__(
        self,
        processor: PaLlavaProcessor,
        samples: Sequence[Sample],
        cache: FeatureCache | None = None,
        image_keys: Sequence[str | None] | None = None,
        views: ViewMaker | None = None,
        packed: bool = False,
    ) -> None:
        if cache is not None and image_keys is None:
            raise ValueError("a feature cache needs the samples' image keys")
        self.processor, self.samples, self.cache, self.image_keys = processor, samples, cache, image_keys
        self.views = views  # how the augmented views are made, when samples use them
        # Samples packed by image (`train.packing`): rows carry positions, segments and a 4-D mask.
        self.packed = packed

    def _image(self, sample: Sample) -> ImageSource:
        if sample.view and self.views is not None:
            return self.views.view(sample.image_source, sample.view, sample.dataset)
        return sample.image_source

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        """Model inputs of the samples at `indices`, plus `num_label_tokens`, `num_samples` (questions: a
        pack counts its members), `num_answers` (those whose answer survived truncation) and `truncated`
        (the ids of samples cut to the processor's `max_length`, as the authors do)."""
        chosen = [self.samples[i] for i in indices]
        encoded, truncated = [], []
        try:
            for sample in chosen:
                if sample.pack is not None:  # encoded when packed, within max_length
                    encoded.append(([], []))
                    continue
                ids, labels = self._encode(sample)
                if len(ids) > self.processor.max_length:
                    ids, labels = self.processor.truncate(ids, labels)
                    truncated.append(sample.id)
                encoded.append((ids, labels))
            if self.packed:
                rows = [sample_row(s, ids, labels) for s, (ids, labels) in zip(chosen, encoded, strict=True)]
                batch = encode_rows(rows, self.processor.pad_id)
            else:
                batch = self.processor.pad(encoded)
            if self.cache is not None:
                keys = [self.image_keys[i] for i in indices if self.image_keys[i] is not None]
                if keys:
                    batch.update(self.cache.batch(keys))
            else:
                images = [self._image(s) for s in chosen if s.image_source is not None]
                if images:
                    pixels = self.processor.image_processor(images)
                    batch.update(pixel_values=pixels["pixel_values"], tile_mask=pixels["tile_mask"])
        except ValueError as error:
            raise ValueError(f"batch of samples {[s.id for s in chosen]}: {error}") from None
        batch["num_label_tokens"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batch["num_samples"] = sum(len(s.pack.members) if s.pack else 1 for s in chosen)
        batch["num_answers"] = answers_in(batch["labels"], batch.get("segment_ids"))
        batch["truncated"] = truncated
        return batch

    def _encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        placeholders, images = (
            self.processor.count_images(sample.conversation),
            int(sample.image_source is not None),
        )
        if placeholders != images:
            raise ValueError(
                f"sample {sample.id}: {placeholders} <image> placeholder(s) in the text but {images} image(s)"
            )
        return self.processor.encode_conversation(sample.conversation)


def drop_overlong(samples: Sequence[Sample], processor: PaLlavaProcessor) -> tuple[list[Sample], list[str]]:
    """(samples that fit the processor's `max_length`, ids of those that do not), in order.

    Encodes every conversation once, so `data.overlong: drop` costs one tokenisation pass at the start of a
    run
    instead of an error in the middle of it.
    """
    kept, dropped = [], []
    for sample in samples:
        if len(processor.encode_conversation(sample.conversation)[0]) > processor.max_length:
            dropped.append(sample.id)
        else:
            kept.append(sample)
    return kept, dropped


class StepBatches(torch.utils.data.Dataset):
    """The micro-batches of one process from a given optimizer step to the end of an epoch, in order."""

    def __init__(self, plan: Sequence[Sequence[int]], collator: Collator) -> None:
        self.plan, self.collator = list(plan), collator

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.collator(self.plan[index])


def epoch_loader(
    samples_count: int,
    collator: Collator,
    seed: int,
    epoch: int,
    first_step: int,
    last_step: int,
    batch_size: int,
    world_size: int,
    grad_accum: int,
    rank: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's micro-batches for steps [first_step, last_step) of `epoch`."""
    order = epoch_order(samples_count, seed, epoch)
    plan = [
        micro
        for step in range(first_step, last_step)
        for micro in micro_batches(order, step, batch_size, world_size, grad_accum, rank)
    ]
    return torch.utils.data.DataLoader(
        StepBatches(plan, collator),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
    )


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """Micro-batches are collated in the dataset already (module-level so worker processes can pickle it)."""
    return batch
