"""Registers the assistant with transformers' Auto classes (`import pallava` runs this).

After it, a saved model folder loads through `AutoConfig`, `AutoModelForImageTextToText`, `AutoProcessor`
and `pipeline("image-text-to-text", model=folder)`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from pallava.models.configuration_pa_llava import PaLlavaConfig, ScaleInvariantConnectorConfig
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.processing.processor import PaLlavaProcessor

AutoConfig.register(PaLlavaConfig.model_type, PaLlavaConfig, exist_ok=True)
AutoConfig.register(ScaleInvariantConnectorConfig.model_type, ScaleInvariantConnectorConfig, exist_ok=True)
AutoModelForImageTextToText.register(PaLlavaConfig, PaLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PaLlavaConfig, PaLlavaProcessor, exist_ok=True)
