"""PA-LLaVA: PLIP vision tower -> scale-invariant connector -> causal language model (+ LoRA)."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    GenerationMixin,
    PreTrainedModel,
)

from pallava.models.attention import use_cpu_bf16_attention
from pallava.models.configuration_pa_llava import PaLlavaConfig
from pallava.models.connector import ScaleInvariantConnector
from pallava.models.pretrained_stem import PretrainedStem
from pallava.models.vision_tower import build_vision_tower


class PaLlavaPreTrainedModel(PreTrainedModel):
    config_class = PaLlavaConfig
    base_model_prefix = "pa_llava"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "LlamaDecoderLayer", "BlipTextLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def lora_config_from(settings: dict) -> LoraConfig:
    """peft LoraConfig from the config's `lora` dict (r, alpha, dropout, target_modules)."""
    unknown = set(settings) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(
            f"unknown LoRA settings {sorted(unknown)}; expected r, alpha, dropout, target_modules"
        )
    return LoraConfig(
        r=settings.get("r", 8),
        lora_alpha=settings.get("alpha", 16),
        lora_dropout=settings.get("dropout", 0.0),
        target_modules=list(settings.get("target_modules", ["q_proj", "v_proj"])),
    )


def restride_head_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the LM head: give a sliced (B, k, H) input standard strides.

    `logits_to_keep` slices the last positions out of (B, L, H) as a view whose batch stride is still L*H.
    torch's CPU bf16 matmul then copies the whole (vocabulary x H) weight before multiplying: seconds per
    prompt for a 128k vocabulary. Copying the k kept rows instead costs nothing.
    """
    hidden = args[0]
    if hidden.dim() == 3 and hidden.stride(0) != hidden.shape[1] * hidden.shape[2]:
        return (hidden.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


class PaLlavaForConditionalGeneration(PaLlavaPreTrainedModel, GenerationMixin):
    """The assistant. Images arrive as `pixel_values` (N, 1+T, 3, S, S) with `tile_mask` (N, T);
    each `<image>` token run in `input_ids` is replaced by the connector's P embeddings."""

    def __init__(
        self,
        config: PaLlavaConfig,
        vision_tower: CLIPVisionModel | None = None,
        language_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_tower = vision_tower or build_vision_tower(config.vision_config)
        self.connector = ScaleInvariantConnector(config.connector_config)
        self.language_model = language_model or AutoModelForCausalLM.from_config(
            config.text_config, trust_remote_code=False
        )
        self.language_model.get_output_embeddings().register_forward_pre_hook(restride_head_input)
        self.post_init()
        use_cpu_bf16_attention(self.vision_tower)  # the fused kernel is slower there (models/attention.py)
        # LoRA after post_init: the generic init must not overwrite LoRA's zero-initialised B matrices.
        if config.lora:
            self.language_model = get_peft_model(self.language_model, lora_config_from(config.lora))
        self.set_trainable(vision=not config.freeze_vision, llm=not config.freeze_llm)

    # --- parts -------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return isinstance(self.language_model, PeftModel)

    @property
    def base_language_model(self) -> PreTrainedModel:
        return self.language_model.get_base_model() if self.has_lora else self.language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.base_language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_language_model.get_output_embeddings()

    def set_trainable(
        self, vision: bool = False, connector: bool = True, llm: bool = False, lora: bool = True
    ) -> None:
        """Choose what trains: by default the connector and LoRA (the paper's recipe).

        A trainable vision tower trains only what its features come from: the layers above
        `vision_feature_layer` and the post-LayerNorm never reach the connector, and distributed training
        refuses parameters that get no gradient.
        """
        tower = self.vision_tower
        tower.requires_grad_(False)
        if vision:
            used = self.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
            for module in (tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[:used]):
                module.requires_grad_(True)
            for stem in tower.modules():  # a pretrained backbone stem trains only its trainable steps
                if isinstance(stem, PretrainedStem):
                    stem.freeze_backbone()
        self.connector.requires_grad_(connector)
        for name, param in self.language_model.named_parameters():
            param.requires_grad_(lora if "lora_" in name else llm)

    def merge_lora(self) -> None:
        """Fold LoRA into the base weights; the model then saves and loads without peft."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()
            self.config.lora = None

    # --- images ------------------------------------------------------------------------------------
    def vision_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's hidden states at `vision_feature_layer` for (K, 3, S, S) crops: (K, 1+P, D).

        Only the layers up to that one run: with the paper's -2 the last layer's work (1/12 of the tower)
        would be thrown away.
        """
        tower, index = self.vision_tower, self.config.vision_feature_layer
        layers = tower.encoder.layers
        if not -(len(layers) + 1) <= index <= len(layers):
            raise ValueError(
                f"vision_feature_layer {index} is outside the tower's {len(layers) + 1} hidden states"
            )
        hidden = tower.pre_layrnorm(tower.embeddings(pixels))  # hidden state 0
        for layer in layers[: index % (len(layers) + 1)]:
            hidden = layer(hidden, None)
        return hidden

    def vision_output_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tower's last layer, post-normed ((K, 1+P, D): its class token is the tower's image embedding),
        continued from `vision_hidden_states`' output, so the layers below the feature layer run once for
        both."""
        tower, layers = self.vision_tower, self.vision_tower.encoder.layers
        for layer in layers[self.config.vision_feature_layer % (len(layers) + 1) :]:
            hidden = layer(hidden, None)
        return tower.post_layernorm(hidden)

    def encode_crops(self, pixel_values: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """Vision features of every crop: (N, 1+T, 3, S, S) -> (N, 1+T, P, D), zeros where `tile_mask` is
        False.

        Masked tiles never go through the vision tower, and neither does a single tile that equals the global
        view (an image that fits one tile, letterboxed the same way twice: most 224 px inputs), whose
        features are the global view's. The result depends on the vision tower only, never on the
        connector, so features cached by one run serve any connector built on the same tower.
        """
        num_images, num_crops = pixel_values.shape[:2]
        crop_mask = torch.cat([tile_mask.new_ones(num_images, 1), tile_mask], dim=1)  # (N, 1+T)
        repeated = self._tile_repeats_global_view(pixel_values, tile_mask)  # (N,)
        encode = crop_mask.clone()
        if bool(repeated.any()):
            encode[repeated, 1] = False
        real = pixel_values[encode].to(self.vision_tower.dtype)  # (K, 3, S, S)
        patches = self.vision_hidden_states(real)[:, 1:]  # drop CLS: (K, P, D)
        features = patches.new_zeros(num_images, num_crops, *patches.shape[1:])
        features[encode] = patches
        if bool(repeated.any()):
            features[repeated, 1] = features[repeated, 0]
        return features

    @staticmethod
    def _tile_repeats_global_view(pixel_values: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the image's only real tile is its first and holds exactly the global view's pixels."""
        repeats = torch.zeros(tile_mask.shape[0], dtype=torch.bool, device=tile_mask.device)
        if tile_mask.shape[1] == 0:
            return repeats
        single = (tile_mask.sum(dim=1) == 1) & tile_mask[:, 0]
        for i in single.nonzero().flatten().tolist():
            repeats[i] = torch.equal(pixel_values[i, 0], pixel_values[i, 1])
        return repeats

    def tiles_to_encode(self, tile_mask: torch.Tensor) -> torch.Tensor:
        """The tiles `encode_crops` must encode for the connector: the real ones, or none when the connector
        reads the global view only (tile cross-attention off)."""
        if self.config.connector_config.tile_cross_attention:
            return tile_mask
        return torch.zeros_like(tile_mask)

    def get_image_embeddings(
        self,
        pixel_values: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
        crop_features: torch.Tensor | None = None,
        return_cross_attentions: bool = False,
    ):
        """(N, P, hidden) language-model embeddings of N images, from pixels or cached crop features."""
        if tile_mask is None:
            raise ValueError("tile_mask is required with images (True for each real tile)")
        if crop_features is None:
            crop_features = self.encode_crops(pixel_values, self.tiles_to_encode(tile_mask))
        crop_features = crop_features.to(self.connector.projection.weight.dtype)
        return self.connector(
            crop_features[:, 0],
            crop_features[:, 1:],
            tile_mask,
            return_cross_attentions=return_cross_attentions,
        )

    def merge_image_embeddings(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image_positions = input_ids == self.config.image_token_id
        text_ids = input_ids.masked_fill(image_positions, 0)  # the image id need not exist in the vocabulary
        inputs_embeds = self.get_input_embeddings()(text_ids)
        n_tokens, n_features = int(image_positions.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_tokens != n_features:
            raise ValueError(
                f"Image features and image tokens do not match: {n_tokens} image tokens in the text, "
                f"{image_embeds.shape[0]} image(s) x {image_embeds.shape[1]} embeddings = {n_features}"
            )
        return inputs_embeds.masked_scatter(
            image_positions.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype)
        )

    # --- forward / generate ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tile_mask: torch.Tensor | None = None,
        crop_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if pixel_values is not None or crop_features is not None:
                image_embeds = self.get_image_embeddings(pixel_values, tile_mask, crop_features)
                inputs_embeds = self.merge_image_embeddings(input_ids, image_embeds)
            else:
                if bool((input_ids == self.config.image_token_id).any()) and (
                    cache is None or cache.get_seq_length() == 0
                ):
                    raise ValueError("the text holds <image> tokens but no images were given")
                inputs_embeds = self.get_input_embeddings()(
                    input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
                )
        if (
            position_ids is None
            and attention_mask is not None
            and (cache is None or cache.get_seq_length() == 0)
        ):
            # Left padding must not shift positions: count only real tokens.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # Images were merged into the cache during prefill.
            for key in ("pixel_values", "tile_mask", "crop_features"):
                inputs.pop(key, None)
        return inputs

    @torch.no_grad()
    def cross_attention_map(self, pixel_values: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """Where the connector looked: mean cross-attention (over layers, heads and queries) that lands on
        each tile patch, (N, T, P). Empty when tile cross-attention is off."""
        _, attentions = self.get_image_embeddings(pixel_values, tile_mask, return_cross_attentions=True)
        if not attentions:
            return pixel_values.new_zeros(pixel_values.shape[0], tile_mask.shape[1], 0)
        stacked = torch.stack(attentions).mean(dim=(0, 2, 3))  # (N, T*P)
        return stacked.reshape(pixel_values.shape[0], tile_mask.shape[1], -1)
