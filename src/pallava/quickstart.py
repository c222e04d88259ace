"""The main job in one command: corpus -> PLIP -> assistant (2 stages) -> evaluation -> an answer -> whole
slides (virtual slides from the train tiles, stage slide, evaluation on virtual slides from the dev tiles).

Every step runs the project's own sub-commands (`pallava data ...`, `pallava plip ...`, `pallava train ...`,
`pallava eval ...`), so the quickstart exercises exactly what users run by hand. A step is skipped when its
completion marker (`OUT/.quickstart/<step>.json`, written after its outputs) and its outputs exist.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pallava.cli import main as pallava_main
from pallava.train.launch import accelerate_command

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = PACKAGE_ROOT.parent / "shared" / "data"
# Three organs: lung and colon (LC25000) and oral mucosa (OSCC, 100x), each with its own train/dev split.
DEFAULT_DATA = (SHARED_DATA / "lc25000-lung", SHARED_DATA / "lc25000-colon", SHARED_DATA / "oscc")
DEFAULT_SAMPLES = PACKAGE_ROOT.parent / "shared" / "data" / "samples"
CONFIGS = PACKAGE_ROOT / "configs"

# Stage 2 trains on a seeded sample of the generated questions (9 per image, 41,220 for the three train
# splits): one pass over a sample this size costs what the CPU budget of the demo allows, and the balancing of
# datasets then repeats the small ones in it.
STAGE2_QUESTIONS = 24_000

# The slide step: virtual slides from the train tiles (stage slide) and from the dev tiles (evaluation), small
# so that building, features, the stage and the evaluation stay within about 2.5 minutes of the demo. Many
# small training slides rather than few large ones (the cost follows the tiles; more slides, less to
# memorise), balanced per organ between tumour and none (no "this organ: yes" shortcut).
SLIDES = {"train": (60, 25, 75), "dev": (18, 50, 150)}  # split -> (slides, fewest tiles, most tiles)
SMOKE_SLIDES = {"train": (3, 8, 12), "dev": (3, 8, 12)}

# Global batches of the training recipes (PLIP 32, the assistant 16): split evenly over the processes.
PLIP_BATCH, ASSISTANT_BATCH = 32, 16


# Captions that describe animal tissue: the text judge must reject them (paper: non-human pathology removed).
NON_HUMAN_CAPTIONS = (
    "Haematoxylin and eosin section of mouse lung from a transgenic model, showing alveolar walls thickened "
    "by "
    "inflammatory cells and a small adenoma at the periphery of the lobe.",
    "Histology of rat lung after experimental exposure: the bronchioles are lined by hyperplastic "
    "epithelium and "
    "the surrounding alveoli contain foamy macrophages and scattered neutrophils.",
    "Canine pulmonary carcinoma from a veterinary biopsy, with atypical glandular structures invading the "
    "interstitium of the dog's lung and a desmoplastic stromal reaction around them.",
)
PHOTO_CAPTION = (
    "A photograph that a careless scraper collected together with pathology figures; it shows {what} and "
    "contains no stained tissue section, no microscope field and no histology at all."
)


@dataclass
class QuickstartSettings:
    """What to run. `smoke` shrinks every step (a handful of images, a few steps) on the same code path."""

    data: list[Path] = field(default_factory=lambda: list(DEFAULT_DATA))
    out: Path = Path("runs/quickstart")
    samples: Path = DEFAULT_SAMPLES
    labels: str | None = None  # default: each dataset's built-in map, merged
    smoke: bool = False
    seed: int = 0
    progress: bool = True
    processes: int = 1  # data-parallel training processes (gloo on CPU); 1, 2 or 4
    plip_args: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    slides: bool = True  # the whole-slide step (virtual slides, stage slide, slide evaluation)


@dataclass
class StepResult:
    name: str
    seconds: float
    metrics: dict
    skipped: bool


class Quickstart:
    def __init__(self, settings: QuickstartSettings):
        self.s = settings
        self.out = settings.out.resolve()
        self.markers = self.out / ".quickstart"
        self.results: list[StepResult] = []

    # --- plumbing ----------------------------------------------------------------------------------
    def run_command(self, *argv: str) -> None:
        args = [str(a) for a in argv]
        if (
            not self.s.progress
            and (args[0] in ("data", "train", "eval") or args[:2] == ["plip", "train"])
            and "--no-progress" not in args
        ):
            args.append("--no-progress")
        if self.s.processes > 1 and _data_parallel(args):
            self.launch(args)
            return
        print(f"\n$ pallava {shlex.join(args)}", flush=True)
        code = pallava_main(args)
        if code:
            raise RuntimeError(f"`pallava {shlex.join(args)}` failed with exit code {code}")

    def launch(self, args: list[str]) -> None:
        command = accelerate_command(args, self.s.processes)
        shown = shlex.join(["accelerate", "launch", *command[3:]])  # the same, as a user types it
        print(f"\n$ {shown}", flush=True)
        # One thread per process: the processes already fill the cores, and idle threads would spin.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        code = subprocess.run(command, env=env).returncode
        if code:
            raise RuntimeError(f"`{shown}` failed with exit code {code}")

    def step(self, name: str, outputs: list[Path], body: Callable[[], dict]) -> dict:
        marker = self.markers / f"{name}.json"
        if marker.is_file() and all(p.exists() for p in outputs):
            recorded = json.loads(marker.read_text())
            print(f"\n== {name}: already complete, skipped ({marker})")
            self.results.append(StepResult(name, recorded["seconds"], recorded["metrics"], skipped=True))
            return recorded["metrics"]
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        metrics = body()
        seconds = time.perf_counter() - start
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"step {name} finished without its outputs: {missing}")
        self.markers.mkdir(parents=True, exist_ok=True)
        temporary = marker.with_suffix(".tmp")
        temporary.write_text(json.dumps({"seconds": seconds, "metrics": metrics}, indent=2))
        temporary.replace(marker)
        self.results.append(StepResult(name, seconds, metrics, skipped=False))
        return metrics

    # --- data ---------------------------------------------------------------------------------------
    def manifests(self) -> dict[str, Path]:
        """Each dataset's labelled manifest by name: the real ones, or (smoke) a few images per class and
        split."""
        from pallava.data.datasets import parse_data_args

        datasets = parse_data_args([str(path) for path in self.s.data]).datasets
        for spec in datasets:
            if not spec.path.endswith(".csv"):
                raise FileNotFoundError(
                    f"no manifest at {spec.path}: pass --data DIR holding manifest.csv "
                    "(path,label,cluster,split); "
                    "see README, 'Your own data'"
                )
        if not self.s.smoke:
            return {spec.name: Path(spec.path) for spec in datasets}
        return {spec.name: self.smoke_subset(spec.name, Path(spec.path)) for spec in datasets}

    def smoke_subset(self, name: str, source: Path) -> Path:
        """4 train and 2 dev images per class of one manifest (absolute paths), in OUT/data/<name>/."""
        subset = self.out / "data" / name / "manifest.csv"
        if subset.is_file():
            return subset
        with source.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        keep, counts = [], {}
        for row in rows:
            key = (row["label"], row.get("split", ""))
            limit = 4 if row.get("split") == "train" else 2
            if counts.get(key, 0) < limit:
                counts[key] = counts.get(key, 0) + 1
                keep.append({**row, "path": str((source.parent / row["path"]).resolve())})
        subset.parent.mkdir(parents=True, exist_ok=True)
        with subset.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(keep[0]))
            writer.writeheader()
            writer.writerows(keep)
        return subset

    def data_args(self, manifests: dict[str, Path]) -> list[str]:
        """`--input M` per dataset (each manifest's folder names its dataset) and the label map, if one is
        set."""
        args = [str(arg) for manifest in manifests.values() for arg in ("--input", manifest)]
        return args + (["--labels", self.s.labels] if self.s.labels else [])

    def build_corpus(self, manifests: dict[str, Path]) -> dict:
        corpus = self.out / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        captions = corpus / "captions.jsonl"
        self.run_command(
            "data",
            "build",
            "--kind",
            "captions",
            *self.data_args(manifests),
            "--split",
            "train",
            "--seed",
            self.s.seed,
            "--out",
            captions,
        )
        records = [json.loads(line) for line in captions.read_text().splitlines() if line.strip()]
        records += self.contaminants(records, corpus)
        raw = corpus / "raw.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in records))
        config = corpus / "clean.yaml"
        config.write_text(
            "# quickstart cleaning: the paper's stages; H&E stain judge for images, lexicon judge for text\n"
            "image_judge: {type: stain}\ntext_judge: {type: lexicon}\nmin_words: 20\n"
        )
        self.run_command("data", "clean", "--input", raw, "--out", corpus / "clean", "--config", config)
        kept = sum(1 for line in (corpus / "clean" / "kept.jsonl").read_text().splitlines() if line.strip())
        rejected = sum(
            1 for line in (corpus / "clean" / "rejected.jsonl").read_text().splitlines() if line.strip()
        )
        return {"input": len(records), "kept": kept, "rejected": rejected}

    def contaminants(self, records: list[dict], corpus: Path) -> list[dict]:
        """Records the cleaning must reject: photographs, non-human captions and a corrupt file."""
        extra = []
        photos = self.s.samples / "non-pathology"
        for path in sorted(photos.glob("*")) if photos.is_dir() else []:
            what = path.stem.replace("_", " ")
            extra.append(
                {
                    "id": f"photo-{path.stem}",
                    "image": str(path.resolve()),
                    "caption": PHOTO_CAPTION.format(what=f"a {what}"),
                    "source": "contaminant",
                }
            )
        rng = random.Random(self.s.seed)
        for index, caption in enumerate(NON_HUMAN_CAPTIONS):
            host = rng.choice(records)
            extra.append(
                {
                    "id": f"non-human-{index}",
                    "image": host["image"],
                    "caption": caption,
                    "source": "contaminant",
                }
            )
        corrupt = corpus / "corrupt.jpg"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated download")
        extra.append(
            {
                "id": "corrupt-file",
                "image": str(corrupt),
                "caption": PHOTO_CAPTION.format(what="nothing"),
                "source": "contaminant",
            }
        )
        return extra

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
        elif self.s.processes > 1:
            args += ["--batch-size", str(PLIP_BATCH // self.s.processes)]  # the same global batch
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
        smoke = ["train.max_steps=2", "train.batch_size=4"] if self.s.smoke else []
        if not self.s.smoke and self.s.processes > 1:  # the same global batch over the processes
            smoke = [f"train.batch_size={ASSISTANT_BATCH // self.s.processes}"]
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
            *smoke,
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
            *smoke,
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
            {"settings": {"seed": self.s.seed}, "benchmarks": benchmarks}, self.out, source="quickstart suite"
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
        smoke = ["train.max_steps=2", "train.batch_size=2", "slide.mil_epochs=2"] if self.s.smoke else []
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

    # --- the whole run -----------------------------------------------------------------------------
    def run(self) -> list[StepResult]:
        self.out.mkdir(parents=True, exist_ok=True)
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
            "vqa_closed_accuracy",
            "vqa_open_accuracy",
            "vqa_choice_accuracy",
            "class_macro_f1",
        )
        lines += [
            "",
            "| dataset (dev split) | images | PLIP zero-shot | closed | open | multiple choice | "
            "class macro F1 |",
            "|---|---|---|---|---|---|---|",
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


def _data_parallel(args: list[str]) -> bool:
    """Training commands that run data-parallel: PLIP and the assistant's two stages (the slide stage's
    batches are whole slides of different sizes: it stays one process)."""
    if args[:2] == ["plip", "train"]:
        return True
    return (
        args[0] == "train" and "--stage" in args and args[args.index("--stage") + 1] in ("align", "instruct")
    )


def _shown(metrics: dict) -> str:
    return ", ".join(
        f"{k} {_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict) and k != "question"
    )


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
