"""Evaluation as a suite: many benchmarks, each model loaded once, per-dataset reports and one summary.

For each benchmark of a suite file (`pallava.eval.suite_config`) this runs the same functions as the
single commands, into `OUT/<name>/`:

- `plip-zeroshot/`: PLIP prompt-ensemble zero-shot classification (as `pallava plip zeroshot`),
- `plip-matching/`: the same by PLIP's image-text matching head (`pallava plip zeroshot --head matching`;
  settings `plip_matching: false` leaves it out),
- `vqa/`: the assistant's closed / open / multiple-choice answers (as `pallava eval vqa`),
- `zeroshot/`: the assistant's zero-shot classification, its answer (a class name) mapped to a label
  (as `pallava eval zeroshot`),

then writes `OUT/summary.{md,json,png}`. A benchmark is skipped on a re-run when its marker
(`OUT/.suite/<name>.json`, written after its reports) matches the run's settings; an unfinished one
resumes from its predictions files.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pallava.data.builders import vqa_from_labels
from pallava.data.importers.manifest import read_labelled_images
from pallava.data.labels import LabelMap
from pallava.data.records import LabelledImage
from pallava.eval.report import vqa_report, write_report, zeroshot_report
from pallava.eval.runner import check_images, class_answering, model_tokenize, run_vqa, run_zeroshot
from pallava.eval.suite_config import Benchmark, Suite, SuiteSettings, load_suite
from pallava.eval.suite_report import class_summary, vqa_summary, write_summary
from pallava.eval.tasks import load_vqa_items, model_prompt_style, sample_items
from pallava.files import changed_keys
from pallava.processing.image import PaLlavaImageProcessor, check_max_pixels
from pallava.processing.loading import DEFAULT_MAX_PIXELS
from pallava.processing.stain_norm import resolve_stain_normalize

MARKERS = ".suite"
# A benchmark asks several questions about each image (the quickstart's suite ten): the assistant keeps the
# vision features of this many recent images, so each image goes through the tower about once.
IMAGES_REMEMBERED = 1024


def _device(device: str | None) -> str | None:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else None)


class LazyAssistant:
    """`PaLlava.from_pretrained(model_dir)` on first use, so a run with nothing left to answer (a
    finished benchmark, a report re-written with another scorer) loads no weights."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | None = None,
        stain_normalize: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.device = device
        # None: what the model records (`processing.stain_norm`); "macenko" or "none" overrides it
        self.stain_normalize = stain_normalize
        # None: the model folder's image processor's limit; a number overrides it
        self.max_pixels_override = check_max_pixels(max_pixels, "--max-pixels")
        self.assistant: Any = None

    @functools.cached_property
    def max_pixels(self) -> int | None:
        """The pixel limit of the images this assistant reads (the override, else the model folder's), known
        without loading its weights; the loaded assistant gets the same."""
        if self.max_pixels_override is not None:
            return self.max_pixels_override
        if not (Path(self.model_dir) / PaLlavaImageProcessor.CONFIG_NAME).is_file():
            return DEFAULT_MAX_PIXELS
        return PaLlavaImageProcessor.from_pretrained(self.model_dir).max_pixels

    def _loaded(self) -> Any:
        if self.assistant is None:
            from pallava.inference import PaLlava

            self.assistant = PaLlava.from_pretrained(
                self.model_dir, device=_device(self.device), stain_normalize=self.stain_normalize
            ).remember_images(IMAGES_REMEMBERED)
            if self.max_pixels_override is not None:
                self.assistant.max_pixels = self.max_pixels_override
        return self.assistant

    def ask_batch(self, images: Sequence[Any], questions: Sequence[str], **options: Any) -> list[str]:
        return self._loaded().ask_batch(images, questions, **options)

    def tile_grid(self, image: Any) -> tuple[int, int]:
        return self._loaded().tile_grid(image)

    def answer_log_likelihoods(self, image: Any, question: str, answers: Sequence[str]) -> list[float]:
        return self._loaded().answer_log_likelihoods(image, question, answers)


@dataclass
class _Models:
    """The models of one suite run, each loaded at most once for every benchmark."""

    assistant: LazyAssistant
    plip_dir: Path | None
    device: str | None
    prompt_style: str | None = None  # the model folder's (a converted release: `paper`)
    _plip: Any = None

    def plip(self) -> Any:
        if self._plip is None:
            from pallava.models.plip import PlipZeroShot

            self._plip = PlipZeroShot.from_pretrained(self.plip_dir, device=_device(self.device) or "cpu")
            requested, recorded = self.assistant.stain_normalize, self._plip.stain_normalize
            self._plip.stain_normalize = resolve_stain_normalize(requested, recorded)
            self._plip.max_pixels = self.assistant.max_pixels  # one limit for every image of the suite
        return self._plip


def _plip_zeroshot(
    models: _Models,
    images: list[LabelledImage],
    label_map: LabelMap,
    folder: Path,
    settings: SuiteSettings,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """PLIP prompt-ensemble classification by its contrastive head and, unless `plip_matching` is off, its
    matching head, each with the `eval zeroshot` report (95% intervals): {part: report}. Both heads read
    one pass through the vision tower."""
    from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES
    from pallava.models.plip.zeroshot import classify_images, classify_tokens

    plip, paths = models.plip(), [i.path for i in images]
    heads = {"plip_zeroshot": "contrastive"}
    if settings.plip_matching:
        heads["plip_matching"] = "matching"
        tokens = plip.encode_image_tokens(paths, settings.plip_batch_size, progress)
    reports = {}
    for part, head in heads.items():
        if settings.plip_matching:
            predicted, proba = classify_tokens(plip, tokens, label_map, ZEROSHOT_TEMPLATES, head)
        else:
            predicted, proba = classify_images(
                plip, paths, label_map, ZEROSHOT_TEMPLATES, head, settings.plip_batch_size, progress
            )
        reports[part] = _plip_report(
            models, images, label_map, folder / _PARTS[part][0], settings, head, predicted, proba
        )
    return reports


def _plip_report(
    models: _Models,
    images: list[LabelledImage],
    label_map: LabelMap,
    out: Path,
    settings: SuiteSettings,
    head: str,
    predicted: list[str],
    proba: Any,
) -> dict[str, Any]:
    """One PLIP head's predictions.jsonl in `out` and its report."""
    from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES

    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for item, label, row in zip(images, predicted, proba, strict=True):
            handle.write(
                json.dumps(
                    {
                        "image": item.path,
                        "label": item.label,
                        "predicted": label,
                        "proba": [round(float(x), 6) for x in row],
                    }
                )
                + "\n"
            )
    report = zeroshot_report(
        [i.label for i in images], predicted, label_map.labels(), settings.n_resamples, settings.seed
    )
    report.update(
        model=str(models.plip_dir),
        class_names=label_map.names(),
        templates=list(ZEROSHOT_TEMPLATES),
        head=head,
    )
    return report


def _assistant_vqa(
    models: _Models, items: Sequence[Any], out: Path, settings: SuiteSettings, progress: bool
) -> dict[str, Any]:
    records = run_vqa(
        models.assistant,
        items,
        out / "predictions.jsonl",
        settings.batch_size,
        settings.max_new_tokens,
        progress=progress,
        prompt_style=models.prompt_style,
        max_pixels=models.assistant.max_pixels,
    )
    tokenize = model_tokenize(models.assistant.model_dir) if settings.scorer == "paper" else None
    report = vqa_report(records, settings.scorer, settings.n_resamples, settings.seed, tokenize=tokenize)
    report["generation"] = {
        "decoding": "greedy",
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
    }
    return report


def _assistant_classification(
    models: _Models,
    images: list[LabelledImage],
    label_map: LabelMap,
    out: Path,
    settings: SuiteSettings,
    progress: bool,
) -> dict[str, Any]:
    records = run_zeroshot(
        models.assistant,
        images,
        label_map,
        out / "predictions.jsonl",
        settings.batch_size,
        settings.class_max_new_tokens,
        progress=progress,
        class_answers=settings.class_answers,
        max_pixels=models.assistant.max_pixels,
    )
    report = zeroshot_report(
        [r["reference"] for r in records],
        [r["predicted_label"] for r in records],
        label_map.labels(),
        settings.n_resamples,
        settings.seed,
    )
    report.update(
        question=records[0]["question"],
        generation=class_answering(
            settings.class_answers, settings.class_max_new_tokens, settings.batch_size
        ),
    )
    return report


# Each part of a benchmark (also its key in the summary row): (folder, report title).
_PARTS = {
    "plip_zeroshot": ("plip-zeroshot", "PLIP zero-shot classification"),
    "plip_matching": ("plip-matching", "PLIP zero-shot classification by the matching head"),
    "vqa": ("vqa", "VQA evaluation"),
    "classification": ("zeroshot", "Zero-shot classification (assistant)"),
}


def _run_benchmark(
    benchmark: Benchmark,
    settings: SuiteSettings,
    limit: int | None,
    models: _Models,
    folder: Path,
    progress: bool,
) -> dict[str, Any]:
    """Run one benchmark's parts; returns its summary row."""
    reports: dict[str, dict[str, Any]] = {}
    source = f"benchmark '{benchmark.name}' ({benchmark.data})"
    if benchmark.kind == "vqa":
        items = load_vqa_items(
            benchmark.data,
            benchmark.format,
            benchmark.split,
            benchmark.image_root,
            folder / "vqa" / "images",
            benchmark.label_map,
            settings.seed,
        )
        items = sample_items(items, limit, settings.seed)
        n = len(items)
        reports["vqa"] = _assistant_vqa(models, items, folder / "vqa", settings, progress)
    else:
        every = read_labelled_images(benchmark.data, benchmark.split)
        # The label map covers the whole manifest, not just the sample, so --limit never changes the classes.
        label_map = LabelMap.resolve(
            benchmark.label_map, {i.label for i in every}, source=f"{source}: label_map"
        )
        images = sample_items(every, limit, settings.seed)
        n = len(images)
        check_images([i.path for i in images], models.assistant.max_pixels)  # before PLIP reads any
        if models.plip_dir is not None:
            reports.update(_plip_zeroshot(models, images, label_map, folder, settings, progress))
        if benchmark.kind == "manifest":
            asked = label_map
            if benchmark.question_label_map:
                asked = LabelMap.resolve(
                    benchmark.question_label_map,
                    {i.label for i in every},
                    source=f"{source}: question_label_map",
                )
            items = vqa_from_labels(images, asked, settings.seed)
            reports["vqa"] = _assistant_vqa(models, items, folder / "vqa", settings, progress)
        reports["classification"] = _assistant_classification(
            models, images, label_map, folder / "zeroshot", settings, progress
        )
    row: dict[str, Any] = {
        "name": benchmark.name,
        "kind": benchmark.kind,
        "data": str(benchmark.data),
        "split": benchmark.split,
        "n": n,
        "reports": {},
    }
    for part, report in reports.items():
        directory, title = _PARTS[part]
        report.update(data=str(benchmark.data), split=benchmark.split, benchmark=benchmark.name)
        report.setdefault("model", str(models.assistant.model_dir))
        write_report(report, folder / directory, title=f"{title}: {benchmark.name}")
        row["reports"][part] = f"{benchmark.name}/{directory}/report.md"
        row.update(vqa_summary(report) if part == "vqa" else {part: class_summary(report)})
    return row


def _definition(
    benchmark: Benchmark,
    settings: SuiteSettings,
    limit: int | None,
    model_dir: Path,
    plip_dir: Path | None,
    stain_normalize: str | None = None,
) -> dict[str, Any]:
    """Everything the predictions of a benchmark depend on (a changed value means other predictions)."""
    definition = {
        "benchmark": benchmark.definition(),
        "limit": limit,
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "class_max_new_tokens": settings.class_max_new_tokens,
        "model": str(model_dir),
        "plip": str(plip_dir) if plip_dir else None,
    }
    if stain_normalize:
        definition["stain_normalize"] = stain_normalize
    if settings.class_answers != "generated":  # folders written before the setting keep their meaning
        definition["class_answers"] = settings.class_answers
    return definition


def _check_same_run(folder: Path, definition: dict[str, Any]) -> None:
    """Refuse to resume into a folder started with other data, limit or models: its predictions would mix."""
    started = folder / "benchmark.json"
    if not started.is_file():
        return
    before = json.loads(started.read_text(encoding="utf-8"))
    changed = changed_keys(before, definition)
    if changed:
        raise ValueError(
            f"{folder} holds results of another run of benchmark '{folder.name}' (changed: "
            f"{', '.join(changed)}); choose another output folder or delete {folder}"
        )


def _finished_row(marker: Path, record: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """The summary row of a benchmark finished with the same definition and report settings, else None."""
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text(encoding="utf-8"))
    same = all(done.get(key) == value for key, value in record.items())
    reports_exist = all((out / path).is_file() for path in done["row"]["reports"].values())
    return done["row"] if same and reports_exist else None


def run_suite(
    model_dir: str | Path,
    suite: str | Path | Suite,
    out_dir: str | Path,
    plip_dir: str | Path | None = None,
    progress: bool = True,
    limit: int | None = None,
    device: str | None = None,
    stain_normalize: str | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Run every benchmark of `suite` (a suite file or a `Suite`) and write `out_dir/summary.{md,json,png}`.

    `limit` overrides every benchmark's `limit` (images for manifests, questions for VQA files). The
    assistant (and PLIP, when `plip_dir` is given) is loaded once, on first need. `max_pixels` overrides
    the model's pixel limit (every image is checked before a benchmark starts). Returns the summary.
    """
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    model = Path(model_dir).resolve()
    plip = Path(plip_dir).resolve() if plip_dir is not None else None
    for path, what in ((model, "--model"), (plip, "--plip")):
        if path is not None and not (path / "config.json").is_file():
            raise ValueError(f"{what} {path}: not a model folder (no config.json)")
    settings = suite.settings
    assistant = LazyAssistant(model, device, stain_normalize, max_pixels)
    models = _Models(assistant, plip, device, model_prompt_style(model))
    rows = []
    for benchmark in suite.benchmarks:
        effective = limit or benchmark.limit or settings.limit
        definition = _definition(benchmark, settings, effective, model, plip, stain_normalize)
        record = {
            "definition": definition,
            "report": {"scorer": settings.scorer, "n_resamples": settings.n_resamples},
        }
        marker = out / MARKERS / f"{benchmark.name}.json"
        row = _finished_row(marker, record, out)
        if row is not None:
            print(f"== {benchmark.name}: already complete, skipped ({marker})", flush=True)
            rows.append(row)
            continue
        folder = out / benchmark.name
        _check_same_run(folder, definition)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "benchmark.json").write_text(json.dumps(definition, indent=2) + "\n", encoding="utf-8")
        print(f"== {benchmark.name} ({benchmark.kind}: {benchmark.data})", flush=True)
        start = time.perf_counter()
        row = _run_benchmark(benchmark, settings, effective, models, folder, progress)
        row["seconds"] = round(time.perf_counter() - start, 2)
        marker.parent.mkdir(parents=True, exist_ok=True)
        temporary = marker.with_suffix(".tmp")
        temporary.write_text(json.dumps({**record, "row": row}, indent=2) + "\n", encoding="utf-8")
        temporary.replace(marker)  # written after the reports: a marker always means a finished benchmark
        rows.append(row)
    summary = {
        "suite": suite.source,
        "model": str(model),
        "plip": str(plip) if plip else None,
        "scorer": settings.scorer,
        "settings": {**asdict(settings), "limit": limit or settings.limit},
        "benchmarks": rows,
    }
    write_summary(summary, out)
    return summary
