"""Cleaning configuration: one dataclass, loadable from YAML/JSON, with every field validated by name."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

STAGES = ("integrity", "image", "text", "length", "duplicate")
JUDGE_STAGES = ("image", "text", "length")  # may be reordered between integrity and duplicate
DUPLICATE_MODES = ("pair", "image", "caption", "either")
# Judge options that change how, not what, a judge decides: a resumed run may change them.
OPERATIONAL_JUDGE_FIELDS = frozenset(
    {
        "base_url",
        "api_key",
        "api_key_env",
        "concurrency",
        "timeout",
        "retries",
        "backoff",
        "cache",
        "batch_size",
        "device",
    }
)


@dataclass
class CleanConfig:
    """Settings of `pallava data clean`.

    stages: order of the stages; `integrity` first and `duplicate` last, the others may be reordered or
      dropped (the paper's order is integrity, image, text, length, duplicate).
    max_pixels: images above this are rejected before decoding (paper: 16,777,216).
    min_words: captions with fewer words are rejected (paper: 20); applies to caption records only.
    image_judge: `{type: none|stain|plip|openai, ...}`; text_judge: `{type: none|lexicon|openai, ...}`
      (options per type: see `judges.build_judge`).
    duplicate_mode: `pair` (image and text both repeat), `image`, `caption` or `either`.
    max_hamming: perceptual-hash distance (of 64 bits) under which two images count as the same.
    on_judge_error: `stop` (abort; re-run resumes) or `reject` (record rejected with the error as reason).
    image_root: folder that relative image paths are resolved against (default: the input's folder).
    workers / chunk_size: decoding processes and records per chunk (do not change the result).
    shard_size: if > 0, kept records are also written as Parquet shards of this many records.
    """

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    max_pixels: int = 16_777_216
    min_words: int = 20
    image_judge: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    text_judge: dict[str, Any] = field(default_factory=lambda: {"type": "lexicon"})
    duplicate_mode: str = "pair"
    max_hamming: int = 4
    on_judge_error: str = "stop"
    image_root: str | None = None
    workers: int = 2
    chunk_size: int = 64
    shard_size: int = 0

    def __post_init__(self) -> None:
        stages = list(self.stages)
        if not stages or stages[0] != "integrity" or stages[-1] != "duplicate":
            raise ValueError(
                f"config field 'stages' must start with 'integrity' and end with 'duplicate', got {stages}"
            )
        middle = stages[1:-1]
        bad = [s for s in middle if s not in JUDGE_STAGES]
        if bad or len(set(middle)) != len(middle):
            raise ValueError(
                f"config field 'stages': middle stages must be distinct names from {JUDGE_STAGES}, got "
                f"{middle}"
            )
        if self.duplicate_mode not in DUPLICATE_MODES:
            raise ValueError(
                f"config field 'duplicate_mode' must be one of {DUPLICATE_MODES}, got {self.duplicate_mode!r}"
            )
        if self.on_judge_error not in ("stop", "reject"):
            raise ValueError(
                f"config field 'on_judge_error' must be 'stop' or 'reject', got {self.on_judge_error!r}"
            )
        for name in ("max_pixels", "workers", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config field '{name}' must be at least 1")
        if not 0 <= self.max_hamming <= 16:
            raise ValueError(f"config field 'max_hamming' must be within 0..16, got {self.max_hamming}")
        for name in ("image_judge", "text_judge"):
            judge = getattr(self, name)
            if not isinstance(judge, dict) or "type" not in judge:
                raise ValueError(f"config field '{name}' must be an object with a 'type'")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> CleanConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of cleaning settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> CleanConfig:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot parse: {error}") from None
        return cls.from_dict(data or {}, source=str(path))

    def decision_fields(self) -> dict[str, Any]:
        """The settings that decide kept/rejected (resuming with different ones would mix two runs)."""
        data = asdict(self)
        for name in ("workers", "chunk_size", "shard_size"):
            data.pop(name)
        for judge in ("image_judge", "text_judge"):
            data[judge] = {k: v for k, v in data[judge].items() if k not in OPERATIONAL_JUDGE_FIELDS}
        return data
