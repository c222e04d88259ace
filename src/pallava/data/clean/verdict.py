"""What every judge returns, and the two judge interfaces; the judge modules build on this one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    """One judgement: `ok` keeps the record; `reason` is a short category, `detail` the specifics."""

    ok: bool
    reason: str = ""
    detail: str = ""
    error: bool = False


class ImageJudge(Protocol):
    """A judge whose verdict is a pure function of one image (no model, no connection) may also offer
    `judge_image(path)` and set `in_workers = True`: the pipeline then spreads it over its processes."""

    def judge_images(self, paths: Sequence[Path]) -> list[Verdict]: ...


class TextJudge(Protocol):
    def judge_texts(self, texts: Sequence[str]) -> list[Verdict]: ...
