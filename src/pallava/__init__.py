"""pallava: a pathology language-vision assistant (PLIP encoder, scale-invariant connector, LLM + LoRA)."""

from transformers import AutoConfig, AutoModelForImageTextToText

from pallava.models.configuration_pa_llava import PaLlavaConfig, ScaleInvariantConnectorConfig
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.models.presets import load_preset
from pallava.processing.image import PaLlavaImageProcessor
from pallava.processing.processor import PaLlavaProcessor

AutoConfig.register(PaLlavaConfig.model_type, PaLlavaConfig, exist_ok=True)
AutoConfig.register(ScaleInvariantConnectorConfig.model_type, ScaleInvariantConnectorConfig, exist_ok=True)
AutoModelForImageTextToText.register(PaLlavaConfig, PaLlavaForConditionalGeneration, exist_ok=True)

__all__ = [
    "PaLlavaConfig",
    "PaLlavaForConditionalGeneration",
    "PaLlavaImageProcessor",
    "PaLlavaProcessor",
    "ScaleInvariantConnectorConfig",
    "load_preset",
]
__version__ = "0.1.0"
