"""Corpus building: record types, importers, cleaning, training-set builders and shards (see docs/data.md)."""

from pallava.data.builders import (
    captions_from_labels,
    stage1_conversations,
    stage2_conversations,
    vqa_from_labels,
    vqa_prompt,
)
from pallava.data.labels import ClassInfo, LabelMap
from pallava.data.records import CaptionPair, Conversation, LabelledImage, VQAItem

__all__ = [
    "CaptionPair",
    "ClassInfo",
    "Conversation",
    "LabelMap",
    "LabelledImage",
    "VQAItem",
    "captions_from_labels",
    "stage1_conversations",
    "stage2_conversations",
    "vqa_from_labels",
    "vqa_prompt",
]
