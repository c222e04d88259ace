"""PLIP's converter: vision towers from outside (the authors' released PLIP state dict, local CLIP
checkpoints) into a standard `CLIPVisionModel`, which `build_plip(vision_init=...)` and the assistant take.

The released `plip_80w_196token.bin` is a CLIP vision state dict with keys `vision_model.*` and the
misspelt `post_layrnorm`; the mapping onto `transformers.CLIPVisionModel` strips the prefix, restores
`post_layernorm` and drops the `position_ids` buffer. Full CLIP checkpoints lose their text half.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from pallava.data.io import read_json_object
from pallava.models.presets import paper_vision_config
from pallava.models.vision_tower import build_vision_tower

_PREFIXES = ("module.", "model.", "visual_encoder.", "vision_tower.")
_DROPPED = ("text_model.", "text_projection", "visual_projection", "logit_scale")


def clip_vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map CLIP / PLIP vision keys onto `CLIPVisionModel` keys; text-side and projection tensors are
    dropped."""
    mapped = {}
    for key, value in state.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name.startswith(_DROPPED) or name.endswith("position_ids"):
            continue
        name = name.removeprefix("vision_model.").replace("post_layrnorm", "post_layernorm")
        mapped[name] = value
    return mapped


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The safe reader of `pallava convert` (weights_only, one-line errors for unreadable files)."""
    from pallava.convert.checkpoint import read_state_dict  # here: pallava.convert imports this module

    return read_state_dict(path)


def _vision_config(config_file: Path) -> CLIPVisionConfig | None:
    if not config_file.is_file():
        return None
    data = read_json_object(config_file)
    if data.get("model_type") == "clip":
        data = data.get("vision_config") or {}
    elif data.get("model_type") not in (None, "clip_vision_model"):
        raise ValueError(
            f"{config_file}: model_type {data.get('model_type')!r} is not a CLIP (vision) config"
        )
    try:
        return CLIPVisionConfig(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: not a CLIP vision config ({error})") from None


def load_vision_tower(path: str | Path) -> CLIPVisionModel:
    """A `CLIPVisionModel` from a CLIP / CLIP-vision checkpoint folder or a bare state-dict file.

    A state-dict file (the authors' `.bin`) takes its shape from a `config.json` beside it, else the
    paper's ViT-B/16. Missing or unexpected tensors raise ValueError naming them.
    """
    path = Path(path)
    if path.is_dir():
        config = _vision_config(path / "config.json")
        if config is None:
            raise ValueError(f"{path}: no config.json in the vision checkpoint folder")
        files = [
            path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()
        ]
        if not files:
            raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")
        weights = files[0]
    elif path.is_file():
        config = _vision_config(path.parent / "config.json") or paper_vision_config()
        weights = path
    else:
        raise ValueError(f"vision checkpoint not found: {path}")
    from pallava.convert.checkpoint import check_weights

    state = clip_vision_state_dict(_read_weights(weights))
    check_weights(state, str(weights))
    model = build_vision_tower(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes differ from the config
        reason = str(error).strip().splitlines()[-1].strip()
        raise ValueError(f"{weights}: does not fit a CLIP vision model of this config ({reason})") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights}: does not fit a CLIP vision model of this config "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return model


def convert_plip_checkpoint(src: str | Path, out_dir: str | Path) -> Path:
    """Write the released PLIP encoder (or any CLIP vision checkpoint) as a standalone CLIPVisionModel
    folder."""
    out = Path(out_dir)
    load_vision_tower(src).save_pretrained(out)
    return out
