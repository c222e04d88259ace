"""PLIP configuration: a CLIP ViT vision tower, a BERT-style text tower with cross-attention, ITC/ITM
settings."""

from __future__ import annotations

from transformers import BlipTextConfig, CLIPVisionConfig, PreTrainedConfig


class PlipConfig(PreTrainedConfig):
    r"""Configuration of [`PlipModel`] and its pre-training wrapper.

    Args:
        vision_config (`CLIPVisionConfig` or dict): the vision tower (the assistant's tower uses the same
        class).
        text_config (`BlipTextConfig` or dict): the text tower; BERT layers that cross-attend to image tokens
            in the matching (ITM) pass. `encoder_hidden_size` is forced to the vision width.
        embed_dim (`int`, defaults to 256): width of the shared image-text embedding.
        temp_init (`float`, defaults to 0.07): initial contrastive temperature (learnable).
        temp_min, temp_max (`float`, defaults to 0.001 and 0.5): the temperature is clamped to this range.
        max_text_length (`int`, defaults to 30): captions are truncated to this many tokens.
        image_pooling (`str`, defaults to "cls"): image feature from the [CLS] token ("cls") or the mean of
        the
            patch tokens ("mean").
        text_pooling (`str`, defaults to "cls"): text feature (and ITM input) from the [CLS] state ("cls") or
        the
            masked mean of the token states ("mean", how sentence encoders such as MiniLM were trained).
        use_momentum (`bool`, defaults to True): momentum encoders, feature queues and soft ITC targets.
        momentum (`float`, defaults to 0.995): EMA factor of the momentum encoders.
        queue_size (`int`, defaults to 57600): length of the image and text feature queues.
        alpha (`float`, defaults to 0.4): weight of the momentum (soft) targets in the ITC targets.
        itm_weight (`float`, defaults to 1.0): weight of the matching loss (0 trains ITC only).
        itm_max_pairs (`int`, defaults to 0): positives per process and step used for ITM (each with two hard
            negatives drawn from the whole batch); 0 uses the whole batch. Lower values make ITM cheaper.
    """

    model_type = "pallava_plip"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "text_config": BlipTextConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    embed_dim: int = 256
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    max_text_length: int = 30
    image_pooling: str = "cls"
    text_pooling: str = "cls"
    use_momentum: bool = True
    momentum: float = 0.995
    queue_size: int = 57600
    alpha: float = 0.4
    itm_weight: float = 1.0
    itm_max_pairs: int = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The text layers cross-attend to image tokens: build the cross-attention blocks, sized to the vision
        # width.
        self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        self.text_config.is_decoder = True
        for name in ("image_pooling", "text_pooling"):
            if getattr(self, name) not in ("cls", "mean"):
                raise ValueError(f"PlipConfig: {name} must be 'cls' or 'mean', got {getattr(self, name)!r}")
        if not self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(
                f"PlipConfig: temp_init={self.temp_init} must lie in [temp_min={self.temp_min}, "
                f"temp_max={self.temp_max}]"
            )
        if self.use_momentum and self.queue_size < 1:
            raise ValueError(
                f"PlipConfig: queue_size must be >= 1 when use_momentum is on, got {self.queue_size}"
            )
