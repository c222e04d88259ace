"""Record types shared by importers, the cleaner, the builders and training.

Every record round-trips through `to_dict()` / `from_dict()` so that it can live in JSONL or Parquet.
`from_dict` raises `ValueError` naming the missing or malformed field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pallava.processing.prompts import PROMPT_STYLES  # noqa: F401  (re-exported: records name the styles)

AnswerType = Literal["closed", "open", "choice"]
ANSWER_TYPES: tuple[str, ...] = ("closed", "open", "choice")
ROLES: tuple[str, ...] = ("human", "gpt")
IMAGE_TOKEN = "<image>"


def _require(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Return `data[name]` or raise a ValueError naming the field and the expected type."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected an object, got {type(data).__name__}")
    if name not in data:
        raise ValueError(f"{what}: missing field '{name}'")
    value = data[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{what}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def _meta(data: dict[str, Any], what: str) -> dict[str, Any]:
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: field 'meta' must be an object, got {type(meta).__name__}")
    return dict(meta)


@dataclass
class CaptionPair:
    """An image with its caption (the PCaption unit; input to PLIP pre-training and stage 1)."""

    image: str
    caption: str
    id: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionPair:
        what = f"caption pair {data.get('id', '?') if isinstance(data, dict) else '?'}"
        return cls(
            image=_require(data, "image", str, what),
            caption=_require(data, "caption", str, what),
            id=str(_require(data, "id", (str, int), what)),
            source=str(data.get("source") or ""),
            meta=_meta(data, what),
        )


@dataclass
class Conversation:
    """A LLaVA-format training sample: `conversations` alternates human/gpt turns.

    The first human turn holds the literal `<image>` placeholder when `image` is set.
    """

    id: str
    image: str | None
    conversations: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = f"conversation {self.id}"
        if not self.conversations:
            raise ValueError(f"{what}: field 'conversations' is empty")
        for index, turn in enumerate(self.conversations):
            if not isinstance(turn, dict) or turn.get("from") not in ROLES:
                raise ValueError(f"{what}: conversations[{index}].from must be one of {ROLES}")
            if not isinstance(turn.get("value"), str):
                raise ValueError(f"{what}: conversations[{index}].value must be a string")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "image": self.image, "conversations": self.conversations}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        what = f"conversation {data.get('id', '?') if isinstance(data, dict) else '?'}"
        image = data.get("image") if isinstance(data, dict) else None
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{what}: field 'image' must be a string or null, got {type(image).__name__}")
        turns = _require(data, "conversations", list, what)
        return cls(
            id=str(_require(data, "id", (str, int), what)),
            image=image,
            conversations=[dict(turn) if isinstance(turn, dict) else turn for turn in turns],
            meta=_meta(data, what),
        )


@dataclass
class VQAItem:
    """A visual question: closed (yes/no), open (free text) or choice (answer is an option letter)."""

    id: str
    image: str
    question: str
    answer: str
    answer_type: AnswerType
    options: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = f"VQA item {self.id}"
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"{what}: field 'answer_type' must be one of {ANSWER_TYPES}, got {self.answer_type!r}"
            )
        if self.answer_type == "choice" and not self.options:
            raise ValueError(f"{what}: field 'options' is required for a choice question")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQAItem:
        what = f"VQA item {data.get('id', '?') if isinstance(data, dict) else '?'}"
        options = data.get("options") if isinstance(data, dict) else None
        if options is not None and not (
            isinstance(options, list) and all(isinstance(o, str) for o in options)
        ):
            raise ValueError(f"{what}: field 'options' must be a list of strings or null")
        return cls(
            id=str(_require(data, "id", (str, int), what)),
            image=_require(data, "image", str, what),
            question=_require(data, "question", str, what),
            answer=_require(data, "answer", str, what),
            answer_type=_require(data, "answer_type", str, what),
            options=options,
            meta=_meta(data, what),
        )


@dataclass
class LabelledImage:
    """An image path with its class label; `cluster` groups near-duplicates so splits never leak."""

    path: str
    label: str
    cluster: str | None = None
    split: str | None = None
    dataset: str | None = None  # provenance: the name of the dataset it was read from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelledImage:
        what = f"labelled image {data.get('path', '?') if isinstance(data, dict) else '?'}"
        return cls(
            path=_require(data, "path", str, what),
            label=_require(data, "label", str, what),
            cluster=data.get("cluster") or None,
            split=data.get("split") or None,
            dataset=data.get("dataset") or None,
        )
