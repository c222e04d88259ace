"""Prompt templates: captions generated from class labels for training, and zero-shot class prompts.

Training captions vary the phrasing and the class name (canonical name or a synonym) every time an image
is drawn. The zero-shot ensemble uses its own phrasings, so classification is not a lookup of seen strings.
"""

from __future__ import annotations

import random

from pallava.data.labels import ClassInfo, LabelMap

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{name}.",
    "an H&E image of {name}.",
    "a histopathology image showing {name}.",
    "an H&E stained section of {organ} with {name}.",
    "a microscopy image of {name} in the {organ}.",
    "this tissue shows {name}.",
    "a pathology slide of {name}.",
    "histology of {organ}: {name}.",
    "haematoxylin and eosin staining of {name}.",
    "a tile of {organ} tissue with {name}.",
    "photomicrograph of {name}.",
    "the image shows {name} at high magnification.",
)

# How zero-shot gives an image a class: `contrastive` compares its embedding with each class's prompt
# embeddings (the CLIP protocol, one vector per image: cheap enough for every tile of a slide); `matching`
# asks the ITM head whether each prompt describes the image (BLIP's re-ranking; a text pass per image and
# prompt).
ZEROSHOT_HEADS: tuple[str, ...] = ("contrastive", "matching")

ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "an H&E image of {name}.",
    "a histopathology image of {name}.",
    "an image of {name}.",
    "{name}, H&E.",
    "a microscopic view of {name}.",
    "pathology image showing {name}.",
)


def _fill(template: str, info: ClassInfo, name: str) -> str:
    return template.format(name=name, organ=info.organ or "human")


def caption_for(info: ClassInfo, rng: random.Random, templates: tuple[str, ...] = CAPTION_TEMPLATES) -> str:
    """One random caption for an image of class `info`: random template, canonical name or a synonym."""
    return _fill(rng.choice(templates), info, rng.choice(info.all_names()))


def class_prompts(label_map: LabelMap, templates: tuple[str, ...] = ZEROSHOT_TEMPLATES) -> list[list[str]]:
    """Per class (label-map order), every template filled with every name of the class."""
    return [
        [_fill(template, info, name) for template in templates for name in info.all_names()]
        for info in label_map.values()
    ]
