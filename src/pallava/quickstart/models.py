"""Quickstart models: PLIP, the assistant's two stages, the evaluation suite and an example answer."""

from __future__ import annotations

import json
from pathlib import Path

from pallava.quickstart.runner import StepRunner
from pallava.quickstart.settings import (
    ASSISTANT_BATCH,
    CONFIGS,
    STAGE2_QUESTIONS,
    SUITE_BATCH,
    per_process,
)


class ModelSteps(StepRunner):
    # --- models ------------------------------------------------------------------------------------
    def train_plip(self) -> dict:
        plip = self.out / "plip"
        args = [
            "plip",
            "train",
            "--data",
            self.out / "corpus" / "clean" / "kept.jsonl",
            "--config",
            CONFIGS / "plip-tiny.yaml",
            "--seed",
            self.s.seed,
            "--out",
            plip,
        ]
        if self.s.smoke:
            args += ["--max-steps", "2", "--batch-size", "4"]
        # PLIP runs in this one process, its recipe's `cpu_threads: auto` giving it a thread per core when the
        # machine is idle: its matrices are large enough to share (measured: as fast as data-parallel
        # processes, for less CPU), unlike the assistant's.
        self.run_command(*args, *self.s.plip_args)
        self.run_command("plip", "export-vision", "--model", plip, "--out", self.out / "plip-vision")
        return {}

    def train_assistant(self, manifests: dict[str, Path]) -> dict:
        data = self.out / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.run_command(
            "data",
            "build",
            "--kind",
            "stage1",
            "--input",
            self.out / "corpus" / "clean" / "kept.jsonl",
            "--seed",
            self.s.seed,
            "--out",
            data / "stage1.jsonl",
        )
        self.run_command(
            "data",
            "build",
            "--kind",
            "vqa",
            *self.data_args(manifests),
            "--split",
            "train",
            "--seed",
            self.s.seed,
            "--out",
            data / "vqa-train.jsonl",
        )
        self.run_command(
            "data",
            "build",
            "--kind",
            "stage2",
            "--input",
            data / "vqa-train.jsonl",
            "--out",
            data / "stage2.jsonl",
        )
        if self.s.smoke:
            sizing = instruct_sizing = ["train.max_steps=2", "train.batch_size=4"]
        else:  # stage align's global batch over its processes; stage instruct runs in one (the recipe's)
            sizing = [f"train.batch_size={per_process(ASSISTANT_BATCH, self.s.processes)}"]
            instruct_sizing = []
        recipe = CONFIGS / "assistant-tiny.yaml"
        vision = f"model.vision_path={self.out / 'plip-vision'}"
        self.run_command(
            "train",
            "--stage",
            "align",
            "--config",
            recipe,
            "--data",
            data / "stage1.jsonl",
            "--out",
            self.out / "assistant-align",
            vision,
            *sizing,
            *self.s.train_overrides,
        )
        self.run_command(
            "train",
            "--stage",
            "instruct",
            "--config",
            recipe,
            "--data",
            data / "stage2.jsonl",
            "--init",
            self.out / "assistant-align",
            "--out",
            self.out / "assistant",
            *instruct_sizing,
            *([] if self.s.smoke else [f"data.limit={STAGE2_QUESTIONS}"]),
            *self.s.train_overrides,
        )
        return {}

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, manifests: dict[str, Path]) -> dict:
        """`pallava eval suite` over each dataset's dev split: PLIP zero-shot and the assistant's class
        answers over
        that dataset's own classes (the paper's protocol), and questions that span all trained organs."""
        from pallava.data.importers.manifest import read_manifest
        from pallava.data.labels import LabelMap
        from pallava.eval.suite import run_suite
        from pallava.eval.suite_config import suite_from_dict

        reports = self.out / "reports"
        trained = self.out / "plip" / "label_map.json"  # every class the models were trained on
        classes = LabelMap.from_file(trained)
        benchmarks = []
        for name, manifest in manifests.items():
            own = reports / "label-maps" / f"{name}.json"
            own.parent.mkdir(parents=True, exist_ok=True)
            subset = classes.subset({item.label for item in read_manifest(manifest, "dev")})
            own.write_text(json.dumps(subset.to_dict(), indent=2))
            benchmarks.append(
                {
                    "name": name,
                    "manifest": str(manifest),
                    "split": "dev",
                    "label_map": str(own),
                    "question_label_map": str(trained),
                }
            )
        suite = suite_from_dict(
            {"settings": {"seed": self.s.seed, "batch_size": SUITE_BATCH}, "benchmarks": benchmarks},
            self.out,
            source="quickstart suite",
        )
        print(
            f"\n$ pallava eval suite --model {self.out / 'assistant'} --plip {self.out / 'plip'} "
            f"--out {reports / 'suite'}  (suite of the {len(benchmarks)} dev splits)",
            flush=True,
        )
        summary = run_suite(
            self.out / "assistant",
            suite,
            reports / "suite",
            plip_dir=self.out / "plip",
            progress=self.s.progress,
        )
        return {
            row["name"]: {
                "n": row["n"],
                "plip_zeroshot_accuracy": (row.get("plip_zeroshot") or {}).get("accuracy"),
                "plip_matching_accuracy": (row.get("plip_matching") or {}).get("accuracy"),
                "vqa_closed_accuracy": (row.get("closed") or {}).get("accuracy"),
                "vqa_open_accuracy": (row.get("open") or {}).get("accuracy"),
                "vqa_choice_accuracy": (row.get("choice") or {}).get("accuracy"),
                "class_macro_f1": (row.get("classification") or {}).get("macro_f1"),
            }
            for row in summary["benchmarks"]
        }

    def example_answer(self, manifests: dict[str, Path]) -> dict:
        from pallava.data.importers.manifest import read_manifest
        from pallava.inference import PaLlava

        assistant = PaLlava.from_pretrained(self.out / "assistant")
        question = "What is the diagnosis?"
        answers = {}
        for name, manifest in manifests.items():
            item = read_manifest(manifest, split="dev")[0]
            answer = assistant.ask(item.path, question, max_new_tokens=16)
            print(f"\nimage:    {item.path}  (label {item.label})\nquestion: {question}\nanswer:   {answer}")
            answers[name] = {"image": str(item.path), "label": item.label, "answer": answer}
        return {"question": question, "answers": answers}

    # --- whole slides --------------------------------------------------------------------------------
