"""Shape regimes and the systems compared in them: pallava and its peers, all random-init (weights do not
change speed), built fast and, where shapes match, sharing the very same modules.

Peers, all from transformers with their own processors:
* `llava_next_matched` (peer a): `LlavaNextForConditionalGeneration` with *our* vision tower and LLM and its
  anyres grid scaled to our tile size, so only the connector differs;
* `llava_next_native` (peer b): LLaVA-NeXT with its native CLIP ViT-L/14 at 336 px (what users run);
* `llava_1_5`: `LlavaForConditionalGeneration`, one centre crop through our vision tower.
The image processors are the PIL ones (`*ImageProcessorPil`): the torchvision ones need torchvision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from pallava.models.configuration_pa_llava import PaLlavaConfig, ScaleInvariantConnectorConfig
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import llama3_8b_config, make_processor, paper_config, tiny_config
from pallava.processing.processor import MODEL_INPUT_NAMES
from pallava.processing.tokenizer import BOS, END_HEADER, EOT, IMAGE, START_HEADER, build_tiny_tokenizer

QUESTION = "Describe the image."
PEER_PROMPT = (
    f"{BOS}{START_HEADER}user{END_HEADER}\n\n{IMAGE}\n{QUESTION}{EOT}{START_HEADER}assistant{END_HEADER}\n\n"
)
LLAVA_NEXT_PINPOINTS = [
    [336, 672],
    [672, 336],
    [672, 672],
    [1008, 336],
    [336, 1008],
]  # (height, width), 336 px tiles
SYSTEMS = ("pallava", "llava_next_matched", "llava_next_native", "llava_1_5")
SYSTEM_LABELS = {
    "pallava": "pallava (ours)",
    "llava_next_matched": "LLaVA-NeXT (a) matched shapes",
    "llava_next_native": "LLaVA-NeXT (b) native ViT-L/14-336",
    "llava_1_5": "LLaVA-1.5 single crop",
}


def llama_1b_config() -> LlamaConfig:
    """Llama-3.2-1B's shape (1.24B parameters): width 2048, 16 layers, GQA 32/8 heads, 128k vocabulary,
    tied."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def native_vision_config() -> CLIPVisionConfig:
    """LLaVA-NeXT's own tower: CLIP ViT-L/14 at 336 px (576 patch tokens + CLS)."""
    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        hidden_act="quick_gelu",
    )


@dataclass(frozen=True)
class Regime:
    """A set of shapes, the dtype and device they run in, and which peers take part."""

    name: str
    description: str
    config: Callable[[int], PaLlavaConfig]  # image token id -> our config
    dtype: torch.dtype
    device: str
    peers: tuple[str, ...]


def _paper_proportioned(image_token_id: int) -> PaLlavaConfig:
    connector = ScaleInvariantConnectorConfig(
        output_size=2048
    )  # the paper's 6 layers, projected to the 1B width
    return paper_config(
        text_config=llama_1b_config(), connector_config=connector, image_token_id=image_token_id, lora=None
    )


def _paper(image_token_id: int) -> PaLlavaConfig:
    return paper_config(text_config=llama3_8b_config(), image_token_id=image_token_id, lora=None)


REGIMES = {
    "tiny": Regime(
        "tiny",
        "the test preset: ViT 224/32 width 128, 2-layer connector, 2-layer Llama width 128",
        lambda image_id: tiny_config(lora=None, image_token_id=image_id),
        torch.float32,
        "cpu",
        ("llava_next_matched", "llava_1_5"),
    ),
    "paper-proportioned": Regime(
        "paper-proportioned",
        "PLIP ViT-B/16 at 224 px, the paper's 6-layer connector, Llama-3.2-1B-shaped LLM",
        _paper_proportioned,
        torch.bfloat16,
        "cpu",
        ("llava_next_matched", "llava_next_native", "llava_1_5"),
    ),
    "paper": Regime(
        "paper",
        "PLIP ViT-B/16 at 224 px, the paper's 6-layer connector, Llama-3-8B-shaped LLM (GPU)",
        _paper,
        torch.bfloat16,
        "cuda",
        ("llava_next_matched", "llava_next_native", "llava_1_5"),
    ),
}


def random_init_(module: nn.Module, seed: int, std: float = 0.02, skip: Iterable[nn.Parameter] = ()) -> None:
    """Fill parameters fast: norm weights 1, biases 0, everything else N(0, std) from a cycled random pool.

    Speed does not depend on the values, and drawing a billion normal numbers takes minutes on a small CPU.
    """
    done = {id(p) for p in skip}
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 20, generator=generator) * std
    with torch.no_grad():
        for child in module.modules():
            is_norm = "Norm" in type(child).__name__  # LayerNorm, LlamaRMSNorm, ...
            for name, param in child.named_parameters(recurse=False):
                if id(param) in done:
                    continue
                done.add(id(param))
                if name == "bias":
                    param.zero_()
                elif is_norm:
                    param.fill_(1.0)
                else:
                    flat, chunk = param.view(-1), pool.to(param.device, param.dtype)
                    for start in range(0, flat.numel(), chunk.numel()):
                        stop = min(start + chunk.numel(), flat.numel())
                        flat[start:stop].copy_(chunk[: stop - start])


def build_fast(
    factory: Callable[[], PreTrainedModel], dtype: torch.dtype, device: str = "cpu"
) -> PreTrainedModel:
    """Construct without the (slow) default initialisation, in `dtype`, directly on `device`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(previous)
    return model


@dataclass
class System:
    """A model with the function that turns one image (plus the shared question) into its inputs."""

    key: str
    model: PreTrainedModel
    prepare: Callable[[Image.Image], dict[str, torch.Tensor]]
    image_token_id: int
    processor: object | None = None  # ours: the `PaLlavaProcessor` (to serve the model)

    @property
    def label(self) -> str:
        return SYSTEM_LABELS[self.key]


def build_pallava(regime: Regime, seed: int = 0) -> System:
    tokenizer = build_tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    config = regime.config(image_id)
    if config.text_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"regime {regime.name}: LLM vocabulary {config.text_config.vocab_size} < tokenizer "
            f"{len(tokenizer)}"
        )
    model = build_fast(lambda: PaLlavaForConditionalGeneration(config), regime.dtype, regime.device)
    model.base_language_model.tie_weights()
    random_init_(model, seed)
    model.eval()
    processor = make_processor(config, tokenizer)

    def prepare(image: Image.Image) -> dict[str, torch.Tensor]:
        batch = processor(text=[processor.question(QUESTION)], images=[[image]], add_generation_prompt=True)
        return {k: v.to(regime.device) for k, v in batch.items() if k in MODEL_INPUT_NAMES}

    return System("pallava", model, prepare, image_id, processor)


def peer_config(key: str, ours: PaLlavaConfig) -> LlavaNextConfig | LlavaConfig:
    """The peer's config around our shapes: our tower (or the native one for peer b), our LLM, its own
    grid."""
    vision = native_vision_config() if key == "llava_next_native" else ours.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    common = dict(
        vision_config=vision,
        text_config=ours.text_config,
        image_token_index=ours.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=tokens,
    )
    if key == "llava_1_5":
        return LlavaConfig(**common)
    tile = vision.image_size
    pinpoints = [[h * tile // 336, w * tile // 336] for h, w in LLAVA_NEXT_PINPOINTS]
    return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)


def peer_processor(key: str, config: LlavaNextConfig | LlavaConfig, tokenizer=None):
    """The peer's own transformers processor (PIL image processor) at its tile size."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    sizes = dict(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    options = dict(
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    if key == "llava_1_5":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**sizes), **options)
    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=config.image_grid_pinpoints, **sizes)
    return LlavaNextProcessor(image_processor=image_processor, **options)


def build_peer(key: str, regime: Regime, share: System | None = None, seed: int = 1) -> System:
    """A peer; with `share` (our system) it reuses our LLM, LM head and, at matched shapes, vision tower."""
    if key not in SYSTEMS[1:]:
        raise ValueError(f"unknown peer {key!r}; expected one of {', '.join(SYSTEMS[1:])}")
    tokenizer = build_tiny_tokenizer()
    ours = regime.config(tokenizer.convert_tokens_to_ids(IMAGE))
    config = peer_config(key, ours)
    model_class = LlavaForConditionalGeneration if key == "llava_1_5" else LlavaNextForConditionalGeneration
    model = build_fast(lambda: model_class(config), regime.dtype, regime.device)
    shared: list[nn.Parameter] = []
    if share is not None:
        base = share.model.base_language_model
        model.model.language_model, model.lm_head = base.model, base.lm_head
        if key != "llava_next_native":
            model.model.vision_tower = share.model.vision_tower
        shared = list(share.model.parameters())
    else:
        model.tie_weights()
    random_init_(model, seed, skip=shared)
    model.eval()
    processor = peer_processor(key, config, tokenizer)
    keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes")

    def prepare(image: Image.Image) -> dict[str, torch.Tensor]:
        batch = processor(images=[image], text=[PEER_PROMPT], return_tensors="pt")
        return {k: v.to(regime.device) for k, v in batch.items() if k in keep}

    return System(key, model, prepare, config.image_token_index)


def build_systems(regime: Regime, keys: Iterable[str] | None = None) -> dict[str, System]:
    """Ours plus the regime's peers (or `keys`), sharing modules where the shapes match."""
    ours = build_pallava(regime)
    systems = {"pallava": ours}
    for key in keys if keys is not None else regime.peers:
        systems[key] = build_peer(key, regime, share=ours)
    return systems


def build_one(key: str, regime: Regime) -> System:
    """One system on its own (for memory readings): nothing shared."""
    return build_pallava(regime) if key == "pallava" else build_peer(key, regime)
