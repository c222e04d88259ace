"""Named PLIP presets and the model factory (text/vision initialisation from local checkpoints).

`tiny`: the shared tiny ViT (224 px, patch 32, width 128) + the first 2 layers of MiniLM-L6 (384-d) as text
tower, mean-pooled, ITM on 8 positives per step: trainable on 2 CPU cores in minutes. `paper`: ViT-B/16 + a
BERT-base-shaped text tower, 256-d embedding,
momentum 0.995 with a 57,600-entry queue.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BlipTextConfig, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerBase

from pallava.models.plip.configuration_plip import PlipConfig
from pallava.models.plip.modeling_plip import PlipModel
from pallava.models.plip.text_init import (
    MINILM,
    load_text_tower_weights,
    load_tokenizer,
    text_config_from_bert,
)
from pallava.models.presets import paper_vision_config, tiny_vision_config
from pallava.models.pretrained_stem import load_imagenet_weights
from pallava.models.vision_tower import PallavaVisionModel

PLIP_PRESETS = ("tiny", "paper")
SCRATCH = "scratch"

_PRESET_SETTINGS: dict[str, dict[str, object]] = {
    # MiniLM was trained with mean pooling; its early-layer [CLS] state hardly depends on the text.
    "tiny": {
        "embed_dim": 256,
        "use_momentum": False,
        "queue_size": 4096,
        "text_pooling": "mean",
        "itm_max_pairs": 8,
    },
    "paper": {"embed_dim": 256, "use_momentum": True, "queue_size": 57600, "momentum": 0.995, "alpha": 0.4},
}
# What a recipe's `vision` mapping may change in a from-scratch vision tower.
VISION_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "conv_stem",  # a convolutional stem instead of the patch projection (models/vision_tower.py)
    "conv_stem_blocks",  # residual blocks after each of the stem's stride-2 convolutions but the first
    "pretrained_stem",  # a frozen ImageNet backbone as the stem (models/pretrained_stem.py)
    "pretrained_stem_scales",  # its maps the stem reads, by stride: [32] (default) or e.g. [16, 32]
    "pretrained_stem_trainable",  # how many of the backbone's last steps train (0: all frozen)
)
DEFAULT_TEXT_INIT = {"tiny": MINILM, "paper": SCRATCH}
_TEXT_LAYERS: dict[str, int | None] = {"tiny": 2, "paper": None}


def _bert_base_text_config(encoder_hidden_size: int) -> BlipTextConfig:
    return BlipTextConfig(
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        encoder_hidden_size=encoder_hidden_size,
        is_decoder=True,
        bos_token_id=None,
        sep_token_id=None,
        eos_token_id=None,
    )


def _vision_config(name: str, vision: dict | None) -> CLIPVisionConfig:
    """The preset's vision tower shape with `vision` (CLIPVisionConfig fields) over it."""
    config = tiny_vision_config() if name == "tiny" else paper_vision_config()
    unknown = sorted(set(vision or {}) - set(VISION_FIELDS))
    if unknown:
        raise ValueError(f"vision: unknown field(s) {unknown}; expected some of {list(VISION_FIELDS)}")
    for key, value in (vision or {}).items():
        setattr(config, key, value)
    if getattr(config, "conv_stem", False) and getattr(config, "pretrained_stem", None):
        raise ValueError("vision: conv_stem and pretrained_stem are two stems; ask for one")
    if config.image_size % config.patch_size or config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"vision: image_size ({config.image_size}) must be a multiple of patch_size "
            f"({config.patch_size}) and hidden_size ({config.hidden_size}) of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    return config


def plip_config(
    name: str,
    text_init: str | Path | None = None,
    text_layers: int | None = None,
    vision: dict | None = None,
    **overrides,
) -> PlipConfig:
    """The config of preset `name`; the text tower takes the shape of `text_init` unless it is 'scratch'.

    `text_layers` keeps only the first layers of the text tower (default: the preset's depth); `vision`
    changes the shape of a from-scratch vision tower (e.g. `{"patch_size": 16}`).
    """
    if name not in PLIP_PRESETS:
        raise ValueError(f"unknown PLIP preset {name!r}; choose one of {', '.join(PLIP_PRESETS)}")
    vision = _vision_config(name, vision)
    text_init = DEFAULT_TEXT_INIT[name] if text_init is None else text_init
    text_layers = text_layers if text_layers is not None else _TEXT_LAYERS[name]
    if str(text_init) != SCRATCH:
        text = text_config_from_bert(text_init, vision.hidden_size, text_layers)
    elif name == "tiny":
        text = text_config_from_bert(MINILM, vision.hidden_size, text_layers)
    else:
        text = _bert_base_text_config(vision.hidden_size)
        text.num_hidden_layers = text_layers or text.num_hidden_layers
    settings = {**_PRESET_SETTINGS[name], **overrides}
    return PlipConfig(vision_config=vision, text_config=text, **settings)


def _vision_tower(vision_init: str | Path | CLIPVisionModel | None) -> CLIPVisionModel | None:
    if vision_init is None or isinstance(vision_init, CLIPVisionModel):
        return vision_init
    folder = Path(vision_init)
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file() or '"clip_vision_model"' not in config.read_text():
        raise ValueError(
            f"vision_init {folder}: not a saved CLIPVisionModel folder; convert other checkpoints with "
            "pallava.convert.plip.load_vision_tower (or `pallava plip convert`)"
        )
    return PallavaVisionModel.from_pretrained(folder)


def build_plip(
    name: str,
    text_init: str | Path | None = None,
    vision_init: str | Path | CLIPVisionModel | None = None,
    text_layers: int | None = None,
    seed: int | None = 0,
    vision: dict | None = None,
    **overrides,
) -> tuple[PlipModel, PreTrainedTokenizerBase]:
    """A fresh PLIP model and its tokenizer.

    text_init: 'minilm' (bundled MiniLM-L6), 'scratch', or a local BERT checkpoint folder (default per
    preset).
    vision_init: a `CLIPVisionModel` or its saved folder (default: random). Other formats (the authors'
    PLIP state dict, full CLIP checkpoints) go through `pallava.convert.plip.load_vision_tower` first.
    vision: the shape of a from-scratch vision tower (CLIPVisionConfig fields over the preset's); not
    with `vision_init`, whose shape is fixed.
    """
    if vision and vision_init is not None:
        raise ValueError("vision: a tower shape applies to a from-scratch tower, not to vision_init")
    if seed is not None:
        torch.manual_seed(seed)
    text_init = DEFAULT_TEXT_INIT.get(name, SCRATCH) if text_init is None else text_init
    config = plip_config(name, text_init, text_layers, vision, **overrides)
    vision = _vision_tower(vision_init)
    if vision is not None:
        config.vision_config = vision.config
        config.text_config.encoder_hidden_size = vision.config.hidden_size
    model = PlipModel(config)
    if vision is not None:
        model.vision_model.load_state_dict(vision.state_dict())
    else:  # a fresh tower: its pre-trained stem, if any, starts from ImageNet
        load_imagenet_weights(model.vision_model)
    if str(text_init) != SCRATCH:
        load_text_tower_weights(model.text_model, text_init)
    tokenizer = load_tokenizer(MINILM if str(text_init) == SCRATCH else text_init, config.max_text_length)
    return model, tokenizer
