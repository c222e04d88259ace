"""The main job in one command: corpus -> PLIP -> assistant (2 stages) -> evaluation -> an answer -> whole
slides (virtual slides from the train tiles, stage slide, evaluation on virtual slides from the dev tiles).

Every step runs the project's own sub-commands (`pallava data ...`, `pallava plip ...`, `pallava train ...`,
`pallava eval ...`), so the quickstart exercises exactly what users run by hand. A step is skipped when its
completion marker (`OUT/.quickstart/<step>.json`, written after its outputs) and its outputs exist; a folder
made with other settings (seed, data, labels, stain normalisation, ...: `OUT/.quickstart/settings.json`) is
refused rather than continued.
"""

from __future__ import annotations

import json

from pallava.quickstart.corpus import CorpusSteps
from pallava.quickstart.models import ModelSteps
from pallava.quickstart.settings import (
    DEFAULT_DATA,
    DEFAULT_SAMPLES,
    STAGE2_QUESTIONS,
    QuickstartSettings,
    StepResult,
)
from pallava.quickstart.slides import SlideSteps

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_SAMPLES",
    "STAGE2_QUESTIONS",
    "Quickstart",
    "QuickstartSettings",
    "StepResult",
]


class Quickstart(CorpusSteps, ModelSteps, SlideSteps):
    """The whole run: each step a method of one of the step groups, in order."""

    # --- the whole run -----------------------------------------------------------------------------
    def run(self) -> list[StepResult]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_same_settings()
        manifests = self.manifests()
        clean = self.out / "corpus" / "clean"
        self.step(
            "1-corpus", [clean / "kept.jsonl", clean / "report.md"], lambda: self.build_corpus(manifests)
        )
        self.step(
            "2-plip",
            [self.out / "plip" / "config.json", self.out / "plip-vision" / "config.json"],
            self.train_plip,
        )
        self.step(
            "3-assistant", [self.out / "assistant" / "config.json"], lambda: self.train_assistant(manifests)
        )
        reports = self.out / "reports"
        self.step("4-evaluation", [reports / "suite" / "summary.md"], lambda: self.evaluate(manifests))
        self.step("5-example", [self.out / "assistant"], lambda: self.example_answer(manifests))
        if self.s.slides:
            self.step(
                "6-slides",
                [self.out / "slide-assistant" / "slide_config.json", reports / "slides" / "report.json"],
                lambda: self.train_slides(manifests),
            )
        self.write_summary()
        return self.results

    def write_summary(self) -> None:
        lines = ["| step | time (s) | results |", "|---|---|---|"]
        for r in self.results:
            shown = "per dataset below" if r.name == "4-evaluation" else _shown(r.metrics)
            lines.append(f"| {r.name} | {r.seconds:.0f}{' (earlier run)' if r.skipped else ''} | {shown} |")
        total = sum(r.seconds for r in self.results)
        lines.append(f"| total | {total:.0f} | |")
        evaluation = next((r.metrics for r in self.results if r.name == "4-evaluation"), {})
        columns = (
            "n",
            "plip_zeroshot_accuracy",
            "plip_matching_accuracy",
            "vqa_closed_accuracy",
            "vqa_open_accuracy",
            "vqa_choice_accuracy",
            "class_macro_f1",
        )
        lines += [
            "",
            "| dataset (dev split) | images | PLIP zero-shot | PLIP ITM zero-shot | closed | open | "
            "multiple choice | class macro F1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in evaluation.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        table = "\n".join(lines)
        model, plip = self.out / "assistant", self.out / "plip"
        where = (
            f"- assistant: `{model}`\n- PLIP: `{plip}`\n- reports: "
            f"`{self.out / 'reports' / 'suite' / 'summary.md'}` "
            "(95% intervals, one folder per dataset)\n"
            f"- cleaning report: `{self.out / 'corpus' / 'clean' / 'report.md'}`"
        ) + self.slide_summary()
        commands = (
            f"pallava chat  --model {model} IMAGE 'What is the diagnosis?'\n"
            f"pallava serve --model {model} --port 8000\n"
            f"pallava ui    --model {model}\n"
            f"pallava slide map --slide SLIDE.svs --model {plip} --out slide-map/"
        )
        (self.out / "reports").mkdir(parents=True, exist_ok=True)
        (self.out / "reports" / "summary.md").write_text(
            f"# Quickstart summary\n\n{table}\n\n{where}\n\n```\n{commands}\n```\n"
        )
        (self.out / "reports" / "summary.json").write_text(
            json.dumps([r.__dict__ for r in self.results], indent=2, default=str)
        )
        print(f"\n{table}\n\n{where}\n\nNext:\n{commands}")


def _shown(metrics: dict) -> str:
    return ", ".join(
        f"{k} {_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict) and k != "question"
    )


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
