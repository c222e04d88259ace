"""Configuration of the PA-LLaVA assistant: vision tower, scale-invariant connector, language model."""

from __future__ import annotations

from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig

PAPER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_CONNECTOR_DROPOUT = 0.1  # BERT-base's hidden and attention dropout: the authors' connector config


class ScaleInvariantConnectorConfig(PretrainedConfig):
    """The connector: L BERT-style layers over the global view's tokens, cross-attending to all tiles.

    Args:
        hidden_size: width of the connector layers; equals the vision tower's width (768 in the paper).
        num_hidden_layers: number of layers (6 in the paper).
        num_attention_heads: heads in self- and cross-attention (12 in the paper).
        intermediate_size: feed-forward width (3072 in the paper).
        hidden_act: feed-forward activation.
        layer_norm_eps: epsilon of the post-LayerNorms.
        dropout: dropout probability in train mode, on the attention weights and after each attention and
            feed-forward output (and after the query LayerNorm when `query_layer_norm` is on), as in BERT.
            The authors build their connector from the BERT-base config and train it in train mode, so
            the paper preset (and a converted release) uses 0.1; the default 0 is the tiny preset's
            (docs/model.md says why). Evaluation (eval mode) never drops anything.
        tile_cross_attention: build and use cross-attention to the tile tokens. False reproduces the
            authors' released weights, whose connector has no cross-attention and ignores the tiles.
        output_size: width of the final projection (the language model's hidden size).
        query_layer_norm: normalise the global tokens (LayerNorm without weights) before the first layer,
            as the authors' released connector does; the final residual still adds the raw tokens.
    """

    model_type = "pa_llava_connector"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.0,
        tile_cross_attention: bool = True,
        output_size: int = 4096,
        query_layer_norm: bool = False,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.tile_cross_attention = tile_cross_attention
        self.output_size = output_size
        self.query_layer_norm = query_layer_norm
        super().__init__(**kwargs)


class PaLlavaConfig(PretrainedConfig):
    """Configuration of `PaLlavaForConditionalGeneration`.

    Args:
        vision_config: a `CLIPVisionConfig` (or dict) for the PLIP vision tower.
        connector_config: a `ScaleInvariantConnectorConfig` (or dict).
        text_config: the language model's config (or dict with `model_type`), Llama by default.
        vision_feature_layer: hidden-state index the connector reads (-2: second-to-last, as the paper).
        image_token_id: id of the `<image>` token in the tokenizer; each one is replaced by one image
        embedding.
        grid_policy: anyres tiling policy, `default` (1..max_tiles tiles) or `paper` (their 15 grids).
        max_tiles: most tiles per image.
        lora: LoRA settings for the language model, e.g. `{"r": 128, "alpha": 256, "dropout": 0.05,
            "target_modules": [...]}`; None for no LoRA.
        freeze_vision / freeze_llm: freeze the vision tower / the language model's base weights
            (LoRA and the connector stay trainable).
        vision_model_path / text_model_path: optional local directories of pretrained weights to load
            when the model is first built (not needed once the model is saved).
    """

    model_type = "pa_llava"
    sub_configs = {
        "vision_config": CLIPVisionConfig,
        "connector_config": ScaleInvariantConnectorConfig,
        "text_config": AutoConfig,
    }

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        connector_config: dict | ScaleInvariantConnectorConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        vision_feature_layer: int = -2,
        image_token_id: int = 6,
        grid_policy: str = "default",
        max_tiles: int = 8,
        lora: dict | None = None,
        freeze_vision: bool = True,
        freeze_llm: bool = True,
        vision_model_path: str | None = None,
        text_model_path: str | None = None,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        if isinstance(connector_config, dict):
            connector_config = ScaleInvariantConnectorConfig(**connector_config)
        self.connector_config = (
            connector_config if connector_config is not None else ScaleInvariantConnectorConfig()
        )
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
        self.text_config = text_config if text_config is not None else AutoConfig.for_model("llama")
        self.vision_feature_layer = vision_feature_layer
        self.image_token_id = image_token_id
        self.grid_policy = grid_policy
        self.max_tiles = max_tiles
        self.lora = dict(lora) if lora else None
        self.freeze_vision = freeze_vision
        self.freeze_llm = freeze_llm
        self.vision_model_path = vision_model_path
        self.text_model_path = text_model_path
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate_shapes()

    def validate_shapes(self) -> None:
        if self.connector_config.hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"connector_config.hidden_size ({self.connector_config.hidden_size}) must equal the vision "
                f"tower's hidden_size ({self.vision_config.hidden_size})"
            )
        if self.connector_config.output_size != self.text_config.hidden_size:
            raise ValueError(
                f"connector_config.output_size ({self.connector_config.output_size}) must equal the language "
                f"model's hidden_size ({self.text_config.hidden_size})"
            )

    @property
    def tile_size(self) -> int:
        return self.vision_config.image_size

    @property
    def num_image_tokens(self) -> int:
        """Image embeddings the language model receives per image, whatever its size."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2
