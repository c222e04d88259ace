"""Converters from outside formats into pallava model folders (the authors' released PA-LLaVA weights)."""

from pallava.convert.checkpoint import read_state_dict
from pallava.convert.keys import KeyPlan, checkpoint_target, plan_checkpoint, plan_plip
from pallava.convert.official import ConversionReport, convert_official

__all__ = [
    "ConversionReport",
    "KeyPlan",
    "checkpoint_target",
    "convert_official",
    "plan_checkpoint",
    "plan_plip",
    "read_state_dict",
]
