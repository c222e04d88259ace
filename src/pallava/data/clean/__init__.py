"""Corpus cleaning: integrity, pathology judges, caption length and duplicates, with exactly-once outputs."""

from pallava.data.clean.config import CleanConfig
from pallava.data.clean.judges import LexiconJudge, PlipImageJudge, Verdict, build_judge
from pallava.data.clean.pipeline import JudgeStopped, clean
from pallava.data.clean.ray_engine import clean_on_ray

__all__ = [
    "CleanConfig",
    "JudgeStopped",
    "LexiconJudge",
    "PlipImageJudge",
    "Verdict",
    "build_judge",
    "clean",
    "clean_on_ray",
]
