"""Quickstart whole slides: virtual slides from the train tiles, the slide stage, evaluation on dev-tile
slides."""

from __future__ import annotations

import json
from pathlib import Path

from pallava.quickstart.runner import StepRunner
from pallava.quickstart.settings import CONFIGS, SLIDES, SMOKE_SLIDES


class SlideSteps(StepRunner):
    def train_slides(self, manifests: dict[str, Path]) -> dict:
        """Virtual slides from the train tiles -> stage slide (and attention-MIL) -> evaluation on virtual
        slides from the dev tiles. Tile features are computed once into OUT/slides/features and shared by
        the stage and the evaluation."""
        sizes = SMOKE_SLIDES if self.s.smoke else SLIDES
        slides, features = self.out / "slides", self.out / "slides" / "features"
        for offset, split in enumerate(("train", "dev")):  # another seed for dev: other layouts, too
            n, fewest, most = sizes[split]
            self.run_command(
                "data",
                "build",
                "--kind",
                "virtual-slides",
                *self.data_args(manifests),
                "--split",
                split,
                "--n",
                n,
                "--min-tiles",
                fewest,
                "--max-tiles",
                most,
                *(["--balanced"] if split == "train" else []),
                "--seed",
                self.s.seed + offset,
                "--out",
                slides / split,
            )
        smoke = (
            ["train.max_steps=2", "train.batch_size=2", "slide.mil_epochs=2", "slide.evidence_epochs=2"]
            if self.s.smoke
            else []
        )
        model = self.out / "slide-assistant"
        self.run_command(
            "train",
            "--stage",
            "slide",
            "--config",
            CONFIGS / "slide-tiny.yaml",
            "--data",
            slides / "train",
            "--init",
            self.out / "assistant",
            "--out",
            model,
            "--seed",
            self.s.seed,
            f"slide.plip={self.out / 'plip'}",
            f"feature_cache.dir={features}",
            *smoke,
        )
        report = self.out / "reports" / "slides"
        self.run_command(
            "eval",
            "slides",
            "--model",
            model,
            "--slides",
            slides / "dev",
            "--out",
            report,
            "--cache-dir",
            features,
        )
        methods = json.loads((report / "report.json").read_text())["methods"]
        metrics = {"train_slides": sizes["train"][0], "dev_slides": sizes["dev"][0]}
        for name in ("tumour_present", "tumour_type", "pointing_game"):
            metrics[name] = methods["slide_model"][name]["value"]
        metrics["mil_tumour_present"] = (
            methods.get("attention_mil", {}).get("tumour_present", {}).get("value")
        )
        return metrics

    def slide_summary(self) -> str:
        """Where the slide step's model and report are, for the summary (empty when it did not run)."""
        if not any(r.name == "6-slides" for r in self.results):
            return ""
        model, report = self.out / "slide-assistant", self.out / "reports" / "slides" / "report.md"
        return (
            f"\n- slide model: `{model}` (`pallava slide ask --slide SLIDE --model {model} QUESTION`)"
            f"\n- slide report: `{report}` (the slide model and two baselines on the dev slides)"
        )
