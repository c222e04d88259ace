"""Key layout of the authors' released PA-LLaVA weights, and its mapping onto ours.

Their stage-1/stage-2 checkpoints hold the connector under `projector.model.` (a BERT encoder whose
query branch is `intermediate_query` / `output_query`, then `norm` and a one-layer `mlp`) and the LoRA
matrices under `llm.`; their PLIP file holds a CLIP vision tower (mapped by
`pallava.convert.plip.clip_vision_state_dict`). Index buffers (`position_ids`) carry no weights
and are ignored. Everything else is unmapped and reported, never dropped silently.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from pallava.convert.plip import clip_vision_state_dict

CONNECTOR_LAYER = re.compile(r"^projector\.model\.bert\.encoder\.layer\.(\d+)\.(.+)$")
# Their per-layer sub-modules -> ours. The query branch is the connector; a text branch
# (`intermediate.`, `output.`) has no counterpart and stays unmapped.
LAYER_RENAMES = (
    ("attention.", "attention."),
    ("crossattention.", "crossattention."),
    ("intermediate_query.", "intermediate."),
    ("output_query.", "output."),
)
CONNECTOR_RENAMES = (
    ("projector.model.norm.", "connector.norm."),
    ("projector.model.mlp.model.0.", "connector.projection."),
)
LORA_ADAPTER = re.compile(r"\.(lora_[AB])\.weight$")
WRAPPER_PREFIXES = ("module.",)  # DeepSpeed / DDP wrappers


@dataclass
class KeyPlan:
    """Where each source tensor goes: `mapping` (source -> target), `ignored` index buffers, `unmapped`."""

    mapping: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)


def strip_wrappers(key: str) -> str:
    """A key without the `module.` prefix that DeepSpeed / DDP wrappers add."""
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def checkpoint_target(key: str) -> str | None:
    """Our parameter name for one key of their stage-1/stage-2 checkpoint; None if it has no counterpart."""
    layer = CONNECTOR_LAYER.match(key)
    if layer:
        index, rest = layer.groups()
        for theirs, ours in LAYER_RENAMES:
            if rest.startswith(theirs):
                return f"connector.layers.{index}.{ours}{rest.removeprefix(theirs)}"
        return None
    for theirs, ours in CONNECTOR_RENAMES:
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    if key.startswith("llm.") and ".lora_" in key:
        # peft names the adapter ("default"); some exporters drop it.
        return "language_model." + LORA_ADAPTER.sub(r".\1.default.weight", key.removeprefix("llm."))
    return None


def plan_checkpoint(keys: Iterable[str]) -> KeyPlan:
    plan = KeyPlan()
    for key in keys:
        target = checkpoint_target(key)
        if target is not None:
            plan.mapping[key] = target
        elif key.endswith("position_ids"):
            plan.ignored.append(key)
        else:
            plan.unmapped.append(key)
    return plan


def plan_plip(keys: Iterable[str]) -> KeyPlan:
    """Their PLIP vision keys -> `vision_tower.*` (the PLIP module's CLIP mapping, key by key)."""
    plan = KeyPlan()
    for key in keys:
        mapped = list(clip_vision_state_dict({key: None}))
        if mapped:
            plan.mapping[key] = "vision_tower." + mapped[0]
        elif key.endswith("position_ids"):
            plan.ignored.append(key)
        else:
            plan.unmapped.append(key)
    return plan


def _fold(head: str, tail: str, indices: set[int]) -> str:
    if not indices:
        return head
    middle = str(min(indices)) if len(indices) == 1 else "{" + ",".join(map(str, sorted(indices))) + "}"
    return f"{head}.{middle}.{tail}"


def summarize_keys(keys: Iterable[str], limit: int = 40) -> str:
    """Key names folded over layer indices (`layers.{0,1,5}.mlp.fc1.weight`), one per line, for error
    messages."""
    groups: dict[tuple[str, str], set[int]] = defaultdict(set)
    for key in keys:
        match = re.search(r"\.(\d+)\.", key)
        if match:
            groups[key[: match.start()], key[match.end() :]].add(int(match.group(1)))
        else:
            groups[key, ""] = set()
    lines = [_fold(head, tail, indices) for (head, tail), indices in sorted(groups.items())]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return "\n  ".join(["", *lines])
