"""pallava: a pathology language-vision assistant (PLIP encoder, scale-invariant connector, LLM + LoRA).

Importing the package registers the assistant with transformers' Auto classes (`pallava.models.auto`), so
a saved folder loads through `AutoProcessor`, `AutoModelForImageTextToText` and the `image-text-to-text`
pipeline. That import brings in torch and transformers (a few seconds); the public names themselves load
lazily.
"""

from __future__ import annotations

import importlib
import os
import sys

# OpenMP threads spin while they wait for each other. On a shared CPU the spinning thread burns the core its
# descheduled partner needs: next to other work, two threads ran a first token 4x slower than with passive
# waiting (docs/training.md). Training is the exception: spinning threads train fastest on an idle machine
# (PLIP steps 0.20 s against 0.27 s sleeping) and the trainers' ThreadGovernor drops to one thread, which
# never waits, when another job takes a core. OpenMP reads this when torch loads, so it is set here,
# before; a setting already in the environment (OMP_WAIT_POLICY, GOMP_SPINCOUNT) is kept.
TRAINING_SPIN_COUNT = "300000"  # GNU OpenMP's own default: spin this many times, then sleep


def _training_command(argv: list[str]) -> bool:
    """`pallava train`, `pallava plip train` or `pallava quickstart` (also as `python -m pallava.cli ...`)."""
    words = [arg for arg in argv if not arg.startswith("-")][:2]
    return words[:1] in (["train"], ["quickstart"]) or words == ["plip", "train"]


if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    if _training_command(sys.argv[1:]):
        os.environ["GOMP_SPINCOUNT"] = TRAINING_SPIN_COUNT
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# CPU tensors' memory: freed blocks are kept for the next pass instead of faulting in fresh pages each time
# (a quarter of a paper-proportioned first token; pallava/allocator.py).
importlib.import_module("pallava.allocator").keep_freed_memory()

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
