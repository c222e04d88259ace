"""Judges decide whether a record belongs in a human-pathology corpus.

An image judge answers "is this a pathology image?", a text judge "is this human pathology?". Each takes
a batch and returns one `Verdict` per item, in order. A verdict with `error=True` means the judge could not
decide (endpoint down, model failed); the pipeline then stops or rejects, as configured.

The data layer imports no model: the PLIP image judge receives a `ZeroShotScorer`, and a `plip` judge in a
config loads its folder through the loader the model's own package registers (`pallava.models.plip`
registers `PlipZeroShot.from_pretrained`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pallava.data.clean.verdict import ImageJudge, TextJudge, Verdict
from pallava.processing.loading import DEFAULT_MAX_PIXELS, load_image

__all__ = ["ImageJudge", "LexiconJudge", "PlipImageJudge", "TextJudge", "Verdict", "build_judge"]


class ZeroShotScorer(Protocol):
    """Zero-shot class probabilities: (N, C) for N images and one prompt list per class."""

    def predict_proba(
        self, images: Sequence[Image.Image], class_texts: Sequence[Sequence[str]]
    ) -> np.ndarray: ...


# (model folder, device) -> scorer, by judge type; filled by the packages that own the models.
SCORER_LOADERS: dict[str, Callable[[Path, str], ZeroShotScorer]] = {}


def register_scorer_loader(kind: str, loader: Callable[[Path, str], ZeroShotScorer]) -> None:
    """Let config entries of judge type `kind` load their `model_dir` with `loader(folder, device)`."""
    SCORER_LOADERS[kind] = loader


# Non-human species and experimental terms (whole words, case-insensitive).
NON_HUMAN_TERMS: dict[str, tuple[str, ...]] = {
    "non-human species": (
        "mouse",
        "mice",
        "murine",
        "rat",
        "rats",
        "rodent",
        "rodents",
        "rabbit",
        "rabbits",
        "hamster",
        "hamsters",
        "guinea pig",
        "guinea pigs",
        "pig",
        "pigs",
        "porcine",
        "swine",
        "piglet",
        "piglets",
        "dog",
        "dogs",
        "puppy",
        "cat",
        "cats",
        "feline",
        "kitten",
        "bovine",
        "cow",
        "cows",
        "cattle",
        "sheep",
        "ovine",
        "lamb",
        "goat",
        "goats",
        "caprine",
        "horse",
        "horses",
        "equine",
        "monkey",
        "monkeys",
        "macaque",
        "macaques",
        "non-human primate",
        "non-human primates",
        "zebrafish",
        "chicken",
        "chickens",
        "avian",
        "poultry",
        "ferret",
        "ferrets",
        "drosophila",
        "xenopus",
        "c. elegans",
    ),
    "veterinary or experimental": (
        "veterinary",
        "canine patient",
        "animal model",
        "animal models",
        "experimental animals",
        "laboratory animals",
        "xenograft",
        "xenografts",
        "transgenic",
        "knockout mice",
        "wild-type mice",
        "c57bl/6",
        "balb/c",
        "sprague-dawley",
        "wistar",
        "nude mice",
    ),
}
# Phrases that mention an animal without the tissue being animal (antibody reagents, eponyms).
ALLOWED_PHRASES: tuple[str, ...] = (
    r"\b(mouse|rabbit|goat|rat|donkey|sheep|horse|chicken|guinea "
    r"pig)\s+(anti\b|anti-|monoclonal|polyclonal|igg|igm|antibod|serum)",
    r"\banti-?\s?(mouse|rabbit|goat|rat|sheep|chicken|human)\b",
    r"\bhorseradish\b",
    r"\bchicken[- ]wire\b",
    r"\brat[- ]bite\b",
    r"\bcat[- ]scratch\b",
    r"\bcanine (tooth|teeth)\b",
    r"\brodent ulcer",
    r"\b(fetal |foetal )?bovine serum\b",
)


class LexiconJudge:
    """Rejects text naming a non-human species or an experimental/veterinary setting; fast and offline."""

    def __init__(self, extra_terms: Sequence[str] = (), allowed_phrases: Sequence[str] = ()) -> None:
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        groups = {reason: list(terms) for reason, terms in NON_HUMAN_TERMS.items()}
        groups["non-human species"].extend(extra_terms)
        for reason, terms in groups.items():
            alternation = "|".join(sorted((re.escape(t.lower()) for t in terms), key=len, reverse=True))
            self._patterns.append((reason, re.compile(rf"(?<![\w-])({alternation})(?![\w-])")))
        self._allowed = re.compile("|".join((*ALLOWED_PHRASES, *allowed_phrases)), re.IGNORECASE)

    def judge_text(self, text: str) -> Verdict:
        cleaned = self._allowed.sub(" ", text).lower()
        for reason, pattern in self._patterns:
            match = pattern.search(cleaned)
            if match:
                return Verdict(False, reason, match.group(1))
        return Verdict(True)

    def judge_texts(self, texts: Sequence[str]) -> list[Verdict]:
        return [self.judge_text(text) for text in texts]


DEFAULT_PATHOLOGY_PROMPTS: tuple[str, ...] = (
    "a histopathology image",
    "an H&E stained tissue section",
    "a microscopy image of human tissue",
    "an immunohistochemistry image of tissue",
    "a cytology smear under the microscope",
)
DEFAULT_NON_PATHOLOGY_PROMPTS: tuple[str, ...] = (
    "a photograph",
    "a photo of a person",
    "a photo of an animal",
    "a photo of an object",
    "a fundus photograph of the retina",
    "a radiology image",
    "a chart or a diagram",
)


class PlipImageJudge:
    """Zero-shot PLIP: keeps an image when p(pathology prompts) >= threshold against the non-pathology
    prompts.

    `model_dir` is a `ZeroShotScorer`, or a trained PLIP folder opened with the registered `plip` loader on
    `device` (`cuda` for a GPU).
    """

    def __init__(
        self,
        model_dir: str | Path | ZeroShotScorer,
        pathology_prompts: Sequence[str] = DEFAULT_PATHOLOGY_PROMPTS,
        non_pathology_prompts: Sequence[str] = DEFAULT_NON_PATHOLOGY_PROMPTS,
        threshold: float = 0.5,
        batch_size: int = 32,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        device: str = "cpu",
    ) -> None:
        if hasattr(model_dir, "predict_proba"):
            self.model = model_dir
        else:
            if not Path(model_dir).is_dir():
                raise ValueError(f"PLIP image judge: model folder not found: {model_dir}")
            if "plip" not in SCORER_LOADERS:
                raise ValueError(
                    "PLIP image judge: no loader for PLIP folders is registered; import pallava.models.plip "
                    "first (`pallava data clean` does)"
                )
            self.model = SCORER_LOADERS["plip"](Path(model_dir), device)
        if not pathology_prompts or not non_pathology_prompts:
            raise ValueError("PLIP image judge: both prompt lists must be non-empty")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"PLIP image judge: threshold must be in (0, 1), got {threshold}")
        self.class_texts = [list(pathology_prompts), list(non_pathology_prompts)]
        self.threshold, self.batch_size, self.max_pixels = threshold, batch_size, max_pixels

    def pathology_probability(self, paths: Sequence[Path]) -> list[float]:
        probabilities: list[float] = []
        for start in range(0, len(paths), self.batch_size):
            images = [load_image(p, self.max_pixels) for p in paths[start : start + self.batch_size]]
            probabilities.extend(float(p) for p in self.model.predict_proba(images, self.class_texts)[:, 0])
        return probabilities

    def judge_images(self, paths: Sequence[Path]) -> list[Verdict]:
        return [
            Verdict(True, detail=f"p={p:.3f}")
            if p >= self.threshold
            else Verdict(False, "not pathology (PLIP)", f"p(pathology)={p:.3f} < {self.threshold}")
            for p in self.pathology_probability(paths)
        ]


def build_judge(spec: dict[str, Any], stage: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Any:
    """Make the judge a config entry describes (`type`: none, lexicon, stain, plip, openai); None for
    `none`."""
    options = {k: v for k, v in spec.items() if k != "type"}
    kind = spec.get("type")
    try:
        if kind == "none":
            return None
        if kind == "lexicon" and stage == "text":
            return LexiconJudge(**options)
        if kind == "stain" and stage == "image":
            from pallava.data.clean.stain_judge import StainJudge

            return StainJudge(max_pixels=max_pixels, **options)
        if kind == "plip" and stage == "image":
            if "model_dir" not in options:
                raise ValueError("needs 'model_dir' (a trained PLIP folder)")
            return PlipImageJudge(max_pixels=max_pixels, **options)
        if kind == "openai":
            from pallava.data.clean.llm_judge import OpenAIJudge

            return OpenAIJudge(kind=stage, max_pixels=max_pixels, **options)
    except TypeError as error:
        raise ValueError(f"{stage}_judge ({kind}): bad option: {error}") from None
    except ValueError as error:
        raise ValueError(f"{stage}_judge ({kind}): {error}") from None
    allowed = "none, stain, plip, openai" if stage == "image" else "none, lexicon, openai"
    raise ValueError(f"{stage}_judge: type must be one of {allowed}, got {kind!r}")
