"""Named presets: `tiny` (random init, CPU, tests and quickstart) and `paper` (the paper's shapes).

`paper` is Llama-3-8B-Instruct + a ViT-B/16 PLIP tower + the 6-layer connector + LoRA r=128. Its
weights come from local directories (`llm_path`, `vision_path`); with `device="meta"` it is built
without memory (for counting parameters).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    PretrainedConfig,
)

from pallava.models.configuration_pa_llava import (
    PAPER_CONNECTOR_DROPOUT,
    PAPER_LORA_TARGETS,
    PaLlavaConfig,
    ScaleInvariantConnectorConfig,
)
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.vision_tower import PallavaVisionModel
from pallava.processing.image import PaLlavaImageProcessor
from pallava.processing.processor import PaLlavaProcessor
from pallava.processing.stain_norm import recorded_stain_normalize
from pallava.processing.tokenizer import IMAGE, build_tiny_tokenizer

PRESETS = ("tiny", "paper")


def tiny_vision_config() -> CLIPVisionConfig:
    """The tiny CLIP ViT shared by PLIP and the assistant: 224 px, patch 32 (49 tokens), width 128."""
    return CLIPVisionConfig(
        image_size=224,
        patch_size=32,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
    )


def paper_vision_config() -> CLIPVisionConfig:
    """PLIP's shape: CLIP ViT-B/16 at 224 px (196 tokens + CLS), width 768, 12 layers."""
    return CLIPVisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    )


def llama3_8b_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=[128001, 128009],
        tie_word_embeddings=False,
    )


def _with_overrides(settings: dict, overrides: dict) -> PaLlavaConfig:
    """A preset's settings with `overrides` on top. A dict given for a sub-config (`vision_config`,
    `connector_config`, `text_config`) or for `lora` changes only the fields it names, so a recipe's
    `{connector_config: {tile_cross_attention: false}}` keeps the preset's widths; anything else replaces."""
    # transformers configs keep any attribute they are given: a misspelt key would silently change nothing
    known = set(inspect.signature(PaLlavaConfig.__init__).parameters) - {"self", "kwargs"}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown model setting {key!r}; expected one of {', '.join(sorted(known))}")
        base = settings.get(key)
        if isinstance(value, dict) and isinstance(base, PretrainedConfig):
            fields = base.to_dict()
            unknown = sorted(set(value) - set(fields))
            if unknown:
                raise ValueError(f"unknown model setting {key}.{unknown[0]}; {key} has no such field")
            value = type(base).from_dict({**fields, **value})
        elif isinstance(value, dict) and isinstance(base, dict):
            value = {**base, **value}
        settings[key] = value
    return PaLlavaConfig(**settings)


def tiny_config(**overrides) -> PaLlavaConfig:
    tokenizer_size = len(build_tiny_tokenizer())
    settings = dict(
        vision_config=tiny_vision_config(),
        connector_config=ScaleInvariantConnectorConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            output_size=128,
        ),
        text_config=LlamaConfig(
            vocab_size=tokenizer_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=0,
            eos_token_id=4,
            pad_token_id=5,
            tie_word_embeddings=False,
        ),
        image_token_id=build_tiny_tokenizer().convert_tokens_to_ids(IMAGE),
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": list(PAPER_LORA_TARGETS)},
    )
    return _with_overrides(settings, overrides)


def paper_config(**overrides) -> PaLlavaConfig:
    settings = dict(
        vision_config=paper_vision_config(),
        connector_config=ScaleInvariantConnectorConfig(
            hidden_size=768,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=3072,
            output_size=4096,
            dropout=PAPER_CONNECTOR_DROPOUT,
        ),
        text_config=llama3_8b_config(),
        image_token_id=128256,  # one past Llama-3's vocabulary: replaced by image embeddings, never looked up
        grid_policy="paper",
        lora={"r": 128, "alpha": 256, "dropout": 0.05, "target_modules": list(PAPER_LORA_TARGETS)},
    )
    return _with_overrides(settings, overrides)


def make_processor(config: PaLlavaConfig, tokenizer) -> PaLlavaProcessor:
    if tokenizer.convert_tokens_to_ids(IMAGE) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_token_id != config.image_token_id:
        raise ValueError(
            f"tokenizer maps {IMAGE} to {image_token_id} but the config says {config.image_token_id}"
        )
    image_processor = PaLlavaImageProcessor(
        tile_size=config.tile_size,
        grid_policy=config.grid_policy,
        max_tiles=config.max_tiles,
        stain_normalize=recorded_stain_normalize(config.vision_config),  # as the tower was trained
    )
    return PaLlavaProcessor(tokenizer, image_processor, num_image_tokens=config.num_image_tokens)


def load_preset(
    name: str,
    *,
    llm_path: str | Path | None = None,
    vision_path: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    **overrides,
) -> tuple[PaLlavaForConditionalGeneration, PaLlavaProcessor | None]:
    """Build a (model, processor) pair by preset name.

    `tiny` is random-init and needs nothing else. `paper` loads the LLM and tokenizer from `llm_path`
    and the PLIP vision tower from `vision_path` (local directories); on `device="meta"` it builds
    the structure only and returns no processor.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if seed is not None:
        torch.manual_seed(seed)
    meta = device is not None and torch.device(device).type == "meta"
    config = tiny_config(**overrides) if name == "tiny" else paper_config(**overrides)
    if meta:
        with torch.device("meta"):
            return PaLlavaForConditionalGeneration(config), None
    vision = language_model = None
    if name == "paper":
        if llm_path is None:
            raise ValueError(
                "the paper preset needs llm_path (a local Llama-3-8B-Instruct directory) unless device='meta'"
            )
        tokenizer = AutoTokenizer.from_pretrained(llm_path, trust_remote_code=False)
        language_model = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=dtype or torch.bfloat16, trust_remote_code=False
        )
        config.text_config = language_model.config
        config.text_model_path = str(llm_path)
    else:
        tokenizer = build_tiny_tokenizer()
    if vision_path is not None:
        vision = PallavaVisionModel.from_pretrained(vision_path, dtype=dtype, trust_remote_code=False)
        config.vision_config = vision.config
        config.vision_model_path = str(vision_path)
    with torch.device(device) if device is not None else nullcontext():
        model = PaLlavaForConditionalGeneration(config, vision_tower=vision, language_model=language_model)
    if dtype is not None:
        model = model.to(dtype)
    processor = make_processor(config, tokenizer)
    # `model.generate(**inputs)` and the pipeline stop at the end of the turn, as `PaLlava` does.
    model.generation_config.eos_token_id = processor.stop_token_ids
    model.generation_config.pad_token_id = processor.pad_id
    return model, processor
