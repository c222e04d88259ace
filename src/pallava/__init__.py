"""pallava: a pathology language-vision assistant (PLIP encoder, scale-invariant connector, LLM + LoRA).

Public names are imported lazily so that `pallava --help` and light sub-commands start fast; importing
the model classes registers them with transformers' Auto classes.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "PaLlavaConfig": "pallava.models.configuration_pa_llava",
    "ScaleInvariantConnectorConfig": "pallava.models.configuration_pa_llava",
    "PaLlavaForConditionalGeneration": "pallava.models.modeling_pa_llava",
    "load_preset": "pallava.models.presets",
    "PaLlavaImageProcessor": "pallava.processing.image",
    "PaLlavaProcessor": "pallava.processing.processor",
    "PaLlava": "pallava.inference",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pallava' has no attribute {name!r}")
