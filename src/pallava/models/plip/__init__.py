"""PLIP: the pathology image-text encoder (CLIP ViT + BERT text tower, ITC + ITM pre-training)."""

from transformers import AutoConfig, AutoModel

from pallava.data.clean.judges import register_scorer_loader
from pallava.models.plip.configuration_plip import PlipConfig
from pallava.models.plip.export import export_vision_tower
from pallava.models.plip.modeling_plip import PlipModel
from pallava.models.plip.presets import PLIP_PRESETS, build_plip, plip_config
from pallava.models.plip.zeroshot import PlipZeroShot

# Saved PLIP folders then open with the Auto classes (and AutoTokenizer can read their config).
AutoConfig.register(PlipConfig.model_type, PlipConfig, exist_ok=True)
AutoModel.register(PlipConfig, PlipModel, exist_ok=True)
# A `plip` image judge in a cleaning config opens its folder with this (the data layer imports no model).
register_scorer_loader("plip", PlipZeroShot.from_pretrained)

__all__ = [
    "PLIP_PRESETS",
    "PlipConfig",
    "PlipModel",
    "PlipZeroShot",
    "build_plip",
    "export_vision_tower",
    "plip_config",
]
