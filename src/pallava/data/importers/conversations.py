"""LLaVA conversation files (JSON list or JSONL): `{id, image, conversations: [{from, value}]}`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pallava.data.io import iter_jsonl, read_json_list
from pallava.data.records import IMAGE_TOKEN, Conversation


def _check_conversation(entry: dict[str, Any], where: str) -> Conversation:
    try:
        conversation = Conversation.from_dict(entry)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    turns = conversation.conversations
    if turns[0]["from"] != "human":
        raise ValueError(f"{where}: conversations[0].from must be 'human' (the user speaks first)")
    for index in range(1, len(turns)):
        if turns[index]["from"] == turns[index - 1]["from"]:
            raise ValueError(
                f"{where}: conversations[{index}].from repeats '{turns[index]['from']}'; turns must alternate"
            )
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if conversation.image is not None and placeholders != 1:
        raise ValueError(
            f"{where}: field 'conversations' must hold exactly one {IMAGE_TOKEN} for field 'image', found "
            f"{placeholders}"
        )
    if conversation.image is None and placeholders:
        raise ValueError(f"{where}: field 'conversations' holds {IMAGE_TOKEN} but field 'image' is missing")
    if conversation.image is not None and IMAGE_TOKEN not in turns[0]["value"]:
        raise ValueError(f"{where}: {IMAGE_TOKEN} must be in the first human turn (conversations[0].value)")
    return conversation


def read_llava(path: str | Path, image_root: str | Path | None = None) -> Iterator[Conversation]:
    """Read LLaVA conversations from `.json` (a list) or `.jsonl`, validating roles and `<image>`
    placement."""
    path = Path(path)
    if path.suffix == ".json":
        entries = ((f"{path}: record {i}", e) for i, e in enumerate(read_json_list(path)))
    else:
        entries = ((f"{path}: line {n}", e) for n, e in iter_jsonl(path))
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object")
        conversation = _check_conversation(entry, where)
        if image_root is not None and conversation.image is not None:
            conversation.image = str(Path(image_root) / conversation.image)
        yield conversation
