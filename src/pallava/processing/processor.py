"""Text + images -> model inputs: Llama-3-Instruct chat format, `<image>` expansion, answer-only labels.

A conversation is a list of turns, either `{"role": "user"|"assistant"|"system", "content": str}` or the
LLaVA form `{"from": "human"|"gpt", "value": str}`. Each `<image>` in a user turn stands for one image and
becomes `num_image_tokens` image tokens. Prompts are encoded turn by turn, so training and generation see
exactly the same token boundaries:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

Exactly one BOS. Labels are -100 everywhere except each assistant answer and its `<|eot_id|>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from pallava.data.io import read_json_object
from pallava.data.records import PROMPT_STYLES
from pallava.processing.image import ImageSource, PaLlavaImageProcessor
from pallava.processing.tokenizer import BOS, END_HEADER, EOT, IMAGE, START_HEADER

IGNORE_INDEX = -100
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

Turn = dict[str, str]


def normalize_turns(conversation: Sequence[Turn]) -> list[tuple[str, str]]:
    """Accept OpenAI-style and LLaVA-style turns; return (role, text) pairs."""
    turns = []
    for index, turn in enumerate(conversation):
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise ValueError(
                f"turn {index}: unknown role {role!r}; expected user/assistant/system (or human/gpt)"
            )
        if not isinstance(text, str):
            raise ValueError(f"turn {index}: content must be a string, got {type(text).__name__}")
        turns.append((ROLE_ALIASES[role], text))
    return turns


# Allowed `processor_config.json` values (inclusive): 196 image tokens in the paper, 8k-128k token contexts.
SETTING_RANGES = {"num_image_tokens": (1, 4096), "max_length": (1, 1 << 20)}


def _read_settings(path: Path) -> dict:
    """The settings of `processor_config.json`, checked: a model folder may come from anyone."""
    settings = read_json_object(path)
    fields = sorted({*SETTING_RANGES, "system_prompt", "prompt_style"})
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; expected {fields}")
    if "num_image_tokens" not in settings:
        raise ValueError(f"{path}: missing field 'num_image_tokens'")
    for name, (low, high) in SETTING_RANGES.items():
        value = settings.get(name, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{path}: {name} must be an integer from {low:,} to {high:,}, got {value!r}")
    if not isinstance(settings.get("system_prompt"), (str, type(None))):
        raise ValueError(f"{path}: system_prompt must be a string or null, got {settings['system_prompt']!r}")
    if settings.get("prompt_style", "pallava") not in PROMPT_STYLES:
        raise ValueError(f"{path}: prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                         f"got {settings['prompt_style']!r}")
    return settings


class PaLlavaProcessor:
    """Tokenizer + image processor for the assistant."""

    CONFIG_NAME = "processor_config.json"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: PaLlavaImageProcessor,
        num_image_tokens: int,
        system_prompt: str | None = None,
        max_length: int = 2048,
        prompt_style: str = "pallava",
    ):
        if prompt_style not in PROMPT_STYLES:  # how `pallava eval` words questions for this model
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.prompt_style = prompt_style
        ids = tokenizer.convert_tokens_to_ids([BOS, START_HEADER, END_HEADER, EOT, IMAGE])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(
                f"tokenizer lacks one of the special tokens {BOS}, {START_HEADER}, {END_HEADER}, {EOT}, {IMAGE}"
            )
        self.bos_id, self.start_header_id, self.end_header_id, self.eot_id, self.image_token_id = ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        settings = {
            "num_image_tokens": self.num_image_tokens,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "prompt_style": self.prompt_style,
        }
        (directory / self.CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PaLlavaProcessor:
        directory = Path(directory)
        path = directory / cls.CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.CONFIG_NAME} in {directory}: not a pallava model directory")
        settings = _read_settings(path)
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        return cls(tokenizer, PaLlavaImageProcessor.from_pretrained(directory), **settings)

    # --- text ---------------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        """Token ids of plain text, with each `<image>` expanded to `num_image_tokens` image ids."""
        ids: list[int] = []
        for index, piece in enumerate(text.split(IMAGE)):
            if index:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
        return ids

    def _header(self, role: str) -> list[int]:
        return [self.start_header_id, *self.tokenizer.encode(role, add_special_tokens=False), self.end_header_id,
                *self.tokenizer.encode("\n\n", add_special_tokens=False)]  # fmt: skip

    def encode_conversation(
        self, conversation: Sequence[Turn], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one conversation; labels keep only assistant answers and their EOT."""
        turns = normalize_turns(conversation)
        if self.system_prompt and not any(role == "system" for role, _ in turns):
            turns.insert(0, ("system", self.system_prompt))
        ids, labels = [self.bos_id], [IGNORE_INDEX]
        for role, text in turns:
            header = self._header(role)
            body = self._text_ids(text.strip() if role != "assistant" else text) + [self.eot_id]
            ids += header + body
            labels += [IGNORE_INDEX] * len(header)
            labels += body if role == "assistant" else [IGNORE_INDEX] * len(body)
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        return ids, labels

    def truncate(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Cut an encoded conversation to `max_length` tokens as the authors do: the end of the text goes,
        the labels go with their tokens, and every image token stays (an image is never cut in part).

        The text keeps its first `max_length - image tokens` tokens, wherever the images sit.
        """
        if len(ids) <= self.max_length:
            return ids, labels
        image_tokens = ids.count(self.image_token_id)
        budget = self.max_length - image_tokens
        if budget < 1:
            raise ValueError(f"{image_tokens} image tokens leave no room for text within max_length {self.max_length}")
        kept_ids, kept_labels = [], []
        for token, label in zip(ids, labels, strict=True):
            if token != self.image_token_id:
                if budget == 0:
                    continue
                budget -= 1
            kept_ids.append(token)
            kept_labels.append(label)
        return kept_ids, kept_labels

    @staticmethod
    def count_images(conversation: Sequence[Turn]) -> int:
        return sum(text.count(IMAGE) for role, text in normalize_turns(conversation) if role == "user")

    # --- batches ------------------------------------------------------------------------------------
    def __call__(
        self,
        conversations: Sequence[Sequence[Turn]],
        images: Sequence[Sequence[ImageSource]] | None = None,
        add_generation_prompt: bool = False,
        padding_side: str = "right",
    ) -> BatchFeature:
        """Encode a batch. `images[i]` lists the images of conversation i, in placeholder order.

        Returns input_ids, attention_mask, labels and, when there are images, pixel_values (N, 1+T, 3, S, S),
        tile_mask (N, T) and grids (N, 2) for the N images of the batch in order.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        images = images if images is not None else [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"got {len(conversations)} conversations but {len(images)} image lists")
        encoded, flat_images = [], []
        for index, (conversation, sample_images) in enumerate(zip(conversations, images, strict=True)):
            expected = self.count_images(conversation)
            if expected != len(sample_images):
                raise ValueError(
                    f"sample {index}: {expected} {IMAGE} placeholder(s) in the text but {len(sample_images)} image(s) given"
                )
            ids, labels = self.encode_conversation(conversation, add_generation_prompt)
            if len(ids) > self.max_length:
                raise ValueError(f"sample {index}: {len(ids)} tokens, over the limit of {self.max_length}")
            encoded.append((ids, labels))
            flat_images.extend(sample_images)
        batch = self.pad(encoded, padding_side)
        if flat_images:
            batch.update(self.image_processor(flat_images))
        return BatchFeature(batch)

    def pad(
        self, encoded: Sequence[tuple[list[int], list[int]]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            span = slice(longest - len(ids), longest) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            labels[row, span] = torch.tensor(lab)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def question(self, question: str, with_image: bool = True) -> list[Turn]:
        """A one-turn conversation; the image goes before the question unless the text places it."""
        if with_image and IMAGE not in question:
            question = f"{IMAGE}\n{question}"
        return [{"role": "user", "content": question}]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.tokenizer.convert_tokens_to_ids("<|end_of_text|>")
        return [self.eot_id] + ([eos] if eos is not None and eos != self.tokenizer.unk_token_id else [])
