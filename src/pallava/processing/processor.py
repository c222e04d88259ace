"""Text + images -> model inputs: Llama-3-Instruct chat format, `<image>` expansion, answer-only labels.

A conversation is a list of turns, either `{"role": "user"|"assistant"|"system", "content": str}` or the
LLaVA form `{"from": "human"|"gpt", "value": str}`. Each `<image>` in a user turn stands for one image and
becomes `num_image_tokens` image tokens. Prompts are encoded turn by turn, so training and generation see
exactly the same token boundaries:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

Exactly one BOS. Labels are -100 everywhere except each assistant answer and its `<|eot_id|>`.

The processor is a transformers `ProcessorMixin`: `processor(images=..., text=...)` takes prompts rendered by
`processor.apply_chat_template(messages)` (the template is saved as `chat_template.jinja`) and gives the same
ids as encoding the conversation itself, so `AutoProcessor`, `model.generate(**inputs)` and the
`image-text-to-text` pipeline see exactly what training saw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import PROCESSOR_NAME

from pallava.files import read_json_object
from pallava.processing.image import PaLlavaImageProcessor
from pallava.processing.loading import ImageSource
from pallava.processing.prompts import PROMPT_STYLES
from pallava.processing.tokenizer import BOS, END_HEADER, EOS, EOT, IMAGE, START_HEADER

IGNORE_INDEX = -100
PIECE_MEMO_SIZE = 65_536  # text pieces whose token ids a processor keeps

# The inputs of `PaLlavaForConditionalGeneration.forward` that the processor makes, in one place for
# inference, training and tests. Training may pass cached `CROP_FEATURES` instead of `pixel_values`.
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "tile_mask")
CROP_FEATURES = "crop_features"
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

Turn = dict[str, str]

# Llama-3-Instruct's format as a Jinja template, rendering exactly what `encode_conversation` encodes.
# Content is a string or transformers' typed parts ({"type": "image"} -> "<image>\n", {"type": "text"}).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system=false) %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}"
    "{% endfor %}"
    "{% if default_system and not ns.system %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ default_system | trim }}<|eot_id|>"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set parts = namespace(text='') %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set parts.text = parts.text + '<image>\n' %}"
    "{% elif part['type'] == 'text' %}{% set parts.text = parts.text + part['text'] %}{% endif %}"
    "{% endfor %}{% set text = parts.text %}"
    "{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{{ text }}{% else %}{{ text | trim }}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _content_text(content: object, index: int) -> str:
    """A turn's text: a string, or transformers' typed parts with each image part as `<image>\n`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        pieces = []
        for part in content:
            if part.get("type") == "image":
                pieces.append(f"{IMAGE}\n")
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise ValueError(f"turn {index}: content part {part!r} is neither an image nor a text part")
        return "".join(pieces)
    raise ValueError(
        f"turn {index}: content must be a string or a list of parts, got {type(content).__name__}"
    )


def normalize_turns(conversation: Sequence[Turn]) -> list[tuple[str, str]]:
    """Accept OpenAI-style, transformers-style (typed parts) and LLaVA-style turns; return (role, text)
    pairs."""
    turns = []
    for index, turn in enumerate(conversation):
        role = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if role not in ROLE_ALIASES:
            raise ValueError(
                f"turn {index}: unknown role {role!r}; expected user/assistant/system (or human/gpt)"
            )
        turns.append((ROLE_ALIASES[role], _content_text(text, index)))
    return turns


def is_conversation(sample: object) -> bool:
    """A list of turns (dicts), as opposed to a rendered prompt string."""
    return isinstance(sample, (list, tuple)) and all(isinstance(turn, dict) for turn in sample)


# Allowed `processor_config.json` values (inclusive): 196 image tokens in the paper, 8k-128k token contexts.
SETTING_RANGES = {"num_image_tokens": (1, 4096), "max_length": (1, 1 << 20)}


def _read_settings(path: Path) -> dict:
    """The settings of `processor_config.json`, checked: a model folder may come from anyone."""
    settings = read_json_object(path)
    if settings.get("processor_class", "PaLlavaProcessor") != "PaLlavaProcessor":
        raise ValueError(
            f"{path}: processor_class must be PaLlavaProcessor, got {settings['processor_class']!r}"
        )
    settings.pop("processor_class", None)  # written by transformers' ProcessorMixin
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
        raise ValueError(
            f"{path}: prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
            f"got {settings['prompt_style']!r}"
        )
    return settings


class PaLlavaProcessor(ProcessorMixin):
    """Tokenizer + image processor for the assistant."""

    CONFIG_NAME = PROCESSOR_NAME

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: PaLlavaImageProcessor,
        num_image_tokens: int,
        system_prompt: str | None = None,
        max_length: int = 2048,
        chat_template: str | None = None,
        prompt_style: str = "pallava",
    ):
        if prompt_style not in PROMPT_STYLES:  # how `pallava eval` words questions for this model
            raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")
        super().__init__(
            tokenizer=tokenizer, image_processor=image_processor, chat_template=chat_template or CHAT_TEMPLATE
        )
        self.image_token = IMAGE
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.prompt_style = prompt_style
        ids = tokenizer.convert_tokens_to_ids([BOS, START_HEADER, END_HEADER, EOT, IMAGE])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(
                f"tokenizer lacks one of the special tokens {BOS}, {START_HEADER}, {END_HEADER}, {EOT}, "
                f"{IMAGE}"
            )
        self.bos_id, self.start_header_id, self.end_header_id, self.eot_id, self.image_token_id = ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_id
        self._special_ids = {
            BOS: self.bos_id,
            START_HEADER: self.start_header_id,
            END_HEADER: self.end_header_id,
            EOT: self.eot_id,
        }
        self._special_split = re.compile("(" + "|".join(map(re.escape, [*self._special_ids, IMAGE])) + ")")
        self._headers: dict[str, list[int]] = {}  # role -> header ids: three tokenizer calls saved a turn
        # text piece -> its ids: generated questions and answers repeat (60,000 pieces of 20,000 stage-2
        # conversations are 1,891 distinct texts), and a tokenizer call was most of encoding one.
        self._pieces: dict[str, tuple[int, ...]] = {}

    # --- transformers plumbing ----------------------------------------------------------------------
    @property
    def model_input_names(self) -> list[str]:
        return list(MODEL_INPUT_NAMES)

    def check_argument_for_proper_class(self, argument_name: str, argument):
        # The image processor is our own (tiling + tile mask), not a transformers image processor.
        if argument_name == "image_processor":
            if not isinstance(argument, PaLlavaImageProcessor):
                raise TypeError(
                    f"image_processor must be a PaLlavaImageProcessor, got {type(argument).__name__}"
                )
            return PaLlavaImageProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self) -> dict:
        settings = super().to_dict()
        settings.pop("image_processor", None)  # saved in its own preprocessor_config.json
        return settings

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template`, with this processor's default system prompt."""
        if self.system_prompt:
            kwargs.setdefault("default_system", self.system_prompt)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, **kwargs) -> list[str]:
        """Tokenizer, `preprocessor_config.json`, `processor_config.json` and `chat_template.jinja`."""
        files = super().save_pretrained(str(directory), **kwargs)
        self.image_processor.save_pretrained(directory)
        return files

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> PaLlavaProcessor:
        directory = Path(directory)
        if not (directory / cls.CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {cls.CONFIG_NAME} in {directory}: not a pallava model directory")
        _read_settings(directory / cls.CONFIG_NAME)  # checked before anything else is read
        return super().from_pretrained(str(directory), **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, directory, processor_dict=None, **kwargs) -> list:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        return [tokenizer, PaLlavaImageProcessor.from_pretrained(directory)]

    # --- text ---------------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        """Token ids of plain text, with each `<image>` expanded to `num_image_tokens` image ids."""
        ids: list[int] = []
        for index, piece in enumerate(text.split(IMAGE)):
            if index:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self._piece_ids(piece))
        return ids

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._pieces.get(piece)
        if ids is None:
            ids = tuple(self.tokenizer.encode(piece, add_special_tokens=False))
            if len(self._pieces) < PIECE_MEMO_SIZE:  # bounded: free text (a chat, a corpus) rarely repeats
                self._pieces[piece] = ids
        return ids

    def _header(self, role: str) -> list[int]:
        if role not in self._headers:
            self._headers[role] = [
                self.start_header_id,
                *self._piece_ids(role),
                self.end_header_id,
                *self._piece_ids("\n\n"),
            ]
        return list(self._headers[role])

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

    def check_length(self, ids: Sequence[int], what: str) -> None:
        """A ValueError naming `what` when `ids` is longer than `max_length`."""
        if len(ids) > self.max_length:
            raise ValueError(f"{what}: {len(ids)} tokens, over the limit of {self.max_length}")

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
            raise ValueError(
                f"{image_tokens} image tokens leave no room for text within max_length {self.max_length}"
            )
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

    def encode_prompt(self, prompt: str, add_bos: bool = True) -> list[int]:
        """Ids of a prompt rendered by the chat template, split exactly as `encode_conversation` splits it:
        special tokens by id, each `<image>` expanded, and the blank line after a header on its own."""
        ids: list[int] = []
        previous = None
        for piece in filter(None, self._special_split.split(prompt)):
            if piece == IMAGE:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            elif piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                text = piece
                if previous == END_HEADER and text.startswith("\n\n"):
                    ids.extend(self.tokenizer.encode("\n\n", add_special_tokens=False))
                    text = text[2:]
                if text:
                    ids.extend(self.tokenizer.encode(text, add_special_tokens=False))
            previous = piece
        if add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    # --- batches ------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Sequence[ImageSource] | Sequence[Sequence[ImageSource]] | ImageSource | None = None,
        text: str | Sequence[str] | Sequence[Sequence[Turn]] | None = None,
        *,
        add_generation_prompt: bool = False,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        padding: bool | str = True,
        videos: None = None,
        audio: None = None,
    ) -> BatchFeature:
        """Encode a batch: `text` is either conversations (lists of turns) or prompts rendered by
        `apply_chat_template`; `images` lists the images in placeholder order, flat or one list per sample.

        Returns input_ids, attention_mask and, when there are images, pixel_values (N, 1+T, 3, S, S) and
        tile_mask (N, T) for the N images of the batch in order. Conversations also get labels (answers
        only); prompts are left-padded for generation unless `padding_side` says otherwise. Batches are
        always padded to the longest sample; a prompt without BOS gets one unless `add_special_tokens=False`.
        """
        if videos is not None or audio is not None:
            raise ValueError("the assistant takes images and text only, not videos or audio")
        if padding not in (True, "longest"):
            raise ValueError(
                f"padding must be True or 'longest' (batches pad to the longest sample), got {padding!r}"
            )
        if text is None:
            raise ValueError("text is required: conversations or prompts with one <image> per image")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        samples = [text] if isinstance(text, str) or is_conversation(text) else list(text)
        conversations = all(is_conversation(sample) for sample in samples)
        if not conversations and not all(isinstance(sample, str) for sample in samples):
            raise ValueError("text must be prompt strings or conversations (lists of turns), not a mix")
        padding_side = padding_side or ("right" if conversations else "left")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        per_sample = self._images_per_sample(samples, images, conversations)
        encoded, flat_images = [], []
        for index, (sample, sample_images) in enumerate(zip(samples, per_sample, strict=True)):
            if conversations:
                expected = self.count_images(sample)
                ids, labels = self.encode_conversation(sample, add_generation_prompt)
            else:
                expected, ids = sample.count(IMAGE), self.encode_prompt(sample, add_special_tokens)
                labels = [IGNORE_INDEX] * len(ids)
            if expected != len(sample_images):
                raise ValueError(
                    f"sample {index}: {expected} {IMAGE} placeholder(s) in the text but "
                    f"{len(sample_images)} image(s) given"
                )
            self.check_length(ids, f"sample {index}")
            encoded.append((ids, labels))
            flat_images.extend(sample_images)
        batch = self.pad(encoded, padding_side)
        if not conversations:
            del batch["labels"]
        if flat_images:
            pixels = self.image_processor(flat_images)
            # An image processor that knows the images' features (the server's cache) gives those instead.
            batch.update({k: pixels[k] for k in ("pixel_values", CROP_FEATURES) if k in pixels})
            batch.update(tile_mask=pixels["tile_mask"])
        return BatchFeature(batch)

    @staticmethod
    def _images_per_sample(samples: Sequence, images, conversations: bool) -> list[list[ImageSource]]:
        """Images grouped by sample: given per sample, or (prompts only) as one flat list split by
        placeholders."""
        if images is None:
            return [[] for _ in samples]
        nested = isinstance(images, (list, tuple)) and all(isinstance(item, (list, tuple)) for item in images)
        if nested and len(images) == len(samples):
            return [list(item) for item in images]
        if conversations:
            raise ValueError(f"got {len(samples)} conversations but {len(images)} image lists")
        if nested:
            flat = [image for item in images for image in item]
        else:
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
        counts = [sample.count(IMAGE) for sample in samples]
        if sum(counts) != len(flat):
            raise ValueError(
                f"{sum(counts)} {IMAGE} placeholder(s) in the text but {len(flat)} image(s) given"
            )
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [flat[start : start + count] for start, count in zip(starts, counts, strict=True)]

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

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **kwargs) -> str:
        """Text of generated ids, stripped."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self.tokenizer.convert_tokens_to_ids(EOS)
        return [self.eot_id] + ([eos] if eos is not None and eos != self.tokenizer.unk_token_id else [])
