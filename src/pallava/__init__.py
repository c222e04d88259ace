"""pallava: a pathology language-vision assistant (PLIP encoder, scale-invariant connector, LLM + LoRA).

Importing the package registers the assistant with transformers' Auto classes (`pallava.models.auto`), so
a saved folder loads through `AutoProcessor`, `AutoModelForImageTextToText` and the `image-text-to-text`
pipeline. That import brings in torch and transformers (a few seconds); the public names themselves load
lazily.
"""

from __future__ import annotations

import importlib
import os

# OpenMP threads spin while they wait for each other. On a shared CPU the spinning thread burns the core its
# descheduled partner needs: next to other work, two threads ran a first token 4x and PLIP training 20x
# slower than with passive waiting (docs/training.md). OpenMP reads this when torch loads, so it is set
# here, before; a setting already in the environment (OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT) is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

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


importlib.import_module("pallava.models.auto")  # last: the modules it loads may use the names above
