"""Map a cohort of slides: one `slide map` folder per slide, a cohort summary CSV and a short report.

`COHORT.csv` has a `path` column (relative paths are resolved against the CSV's folder) and optional
`id` (default: the file name without its extension) and `mpp` (the scan's microns per pixel, for files
that do not record it) columns. Each slide is mapped into `OUT/slides/<id>/` with exactly the files
`pallava slide map` writes. A slide whose `summary.json` matches the model, tiling and classes is
finished and skipped on a re-run; an unfinished one resumes from its embedding cache. A slide that cannot
be mapped (corrupt file, no tissue) is recorded with its reason and the others go on.

Engines: `local` maps the slides one after another in this process with one model; `ray` spreads them
over a pool of Ray actors that each load the model once (`map_on_ray`, below).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pallava.data.labels import LabelMap
from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES
from pallava.scale import cluster_resources, connect
from pallava.slides.mapping import TilingOptions, map_slide, model_fingerprint

SUMMARY_CSV, REPORT = "cohort.csv", "cohort.md"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class CohortSlide:
    """One row of the cohort: a slide file, its id (also its output folder's name), an optional scan mpp."""

    id: str
    path: str
    mpp: float | None = None


@dataclass(frozen=True)
class CohortSettings:
    """What every slide of a cohort is mapped with (the `slide map` options)."""

    options: TilingOptions = TilingOptions()
    label_map: LabelMap = field(default_factory=lambda: LabelMap.builtin("nct-crc-he"))
    templates: tuple[str, ...] = tuple(ZEROSHOT_TEMPLATES)
    batch_size: int = 64
    device: str = "cpu"


def read_cohort(path: str | Path) -> list[CohortSlide]:
    """Parse COHORT.csv; ValueError naming the file, row and field for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: cohort file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(
                f"{path}: expected a header with a 'path' column (and optional 'id', 'mpp'), got {columns}"
            )
        slides, seen = [], {}
        for row_number, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not row.get("path"):
                raise ValueError(f"{path}: row {row_number}: field 'path' is empty")
            slide_path = Path(row["path"])
            slide_path = slide_path if slide_path.is_absolute() else path.parent / slide_path
            slide_id = row.get("id") or slide_path.stem
            if not _ID.match(slide_id):
                raise ValueError(
                    f"{path}: row {row_number}: field 'id' {slide_id!r} must be letters, digits, '.', '_' "
                    "or '-' (it names the slide's output folder)"
                )
            if slide_id in seen:
                raise ValueError(
                    f"{path}: row {row_number}: id {slide_id!r} already used on row {seen[slide_id]}"
                )
            seen[slide_id] = row_number
            mpp = None
            if row.get("mpp"):
                try:
                    mpp = float(row["mpp"])
                except ValueError:
                    mpp = -1.0
                if not mpp > 0:
                    raise ValueError(
                        f"{path}: row {row_number}: field 'mpp' must be a positive number, got {row['mpp']!r}"
                    )
            slides.append(CohortSlide(slide_id, str(slide_path), mpp))
    if not slides:
        raise ValueError(f"{path}: the cohort lists no slides")
    return slides


def slide_options(slide: CohortSlide, options: TilingOptions) -> TilingOptions:
    """The tiling options for one slide: the cohort's, with the row's scan mpp when it gives one."""
    return replace(options, base_mpp=slide.mpp) if slide.mpp is not None else options


def finished_summary(folder: Path, model_id: str, options: TilingOptions, label_map: LabelMap) -> dict | None:
    """The slide's summary.json if a map with this model, tiling and classes wrote it; else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    tiling = summary.get("tiling", {})
    if summary.get("model") != model_id or any(tiling.get(k) != v for k, v in asdict(options).items()):
        return None
    return summary if list(summary.get("classes", {})) == label_map.labels() else None


def summary_row(slide: CohortSlide, summary: dict, status: str) -> dict[str, Any]:
    """One cohort.csv row from a slide's summary.json: tissue area, tiles and the share of tiles per class."""
    info = summary["slide"]
    mpp_x = summary["tiling"].get("base_mpp") or info.get("mpp_x")  # --base-mpp / the row's mpp wins
    mpp_y = summary["tiling"].get("base_mpp") or info.get("mpp_y")
    area = None
    if mpp_x and mpp_y:
        area = round(summary["tissue_fraction"] * info["width"] * info["height"] * mpp_x * mpp_y / 1e6, 3)
    tiles = summary["tiles"]
    fractions = {
        f"fraction:{label}": round(c["tiles_predicted"] / tiles, 4) for label, c in summary["classes"].items()
    }
    return {
        "id": slide.id,
        "path": slide.path,
        "status": status,
        "tissue_fraction": summary["tissue_fraction"],
        "tissue_area_mm2": area,
        "tiles": tiles,
        **fractions,
        "error": "",
    }


def failure_row(slide: CohortSlide, error: BaseException) -> dict[str, Any]:
    message = " ".join(str(error).split()) or type(error).__name__
    return {"id": slide.id, "path": slide.path, "status": "failed", "error": message}


class SlideMapper:
    """Maps slides one at a time with a model loaded once; a bad slide returns its reason, never raises."""

    def __init__(
        self,
        model_dir: str,
        settings: CohortSettings,
        out_dir: str,
        load_model: Callable[[str, str], Any] | None = None,
    ) -> None:
        from pallava.models.plip.zeroshot import PlipZeroShot

        if not Path(model_dir).is_dir():
            raise ValueError(f"PLIP model folder {model_dir} does not exist")
        self.plip = (load_model or PlipZeroShot.from_pretrained)(model_dir, settings.device)
        self.model_id = model_fingerprint(model_dir)
        self.settings, self.out_dir = settings, Path(out_dir)

    def map(self, slide: CohortSlide) -> dict[str, Any]:
        from pallava.slides.reader import open_slide

        options = slide_options(slide, self.settings.options)
        try:
            with open_slide(slide.path) as opened:
                map_slide(
                    opened,
                    self.plip,
                    self.settings.label_map,
                    slide_folder(self.out_dir, slide),
                    self.model_id,
                    options,
                    self.settings.batch_size,
                    self.settings.templates,
                )
        except Exception as error:  # a corrupt or blank slide is reported; the cohort goes on
            return failure_row(slide, error)
        summary = json.loads((slide_folder(self.out_dir, slide) / "summary.json").read_text())
        return summary_row(slide, summary, "mapped")


def slide_folder(out_dir: Path, slide: CohortSlide) -> Path:
    return Path(out_dir) / "slides" / slide.id


def map_cohort(
    cohort: str | Path | Sequence[CohortSlide],
    model_dir: str | Path,
    out_dir: str | Path,
    settings: CohortSettings = CohortSettings(),
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    load_model: Callable[[str, str], Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Map every slide of a cohort (skipping finished ones) and write `cohort.csv` and `cohort.md`.

    Returns one row per slide, in cohort order. `load_model(model_dir, device)` replaces
    `PlipZeroShot.from_pretrained` (a wrapped or instrumented model); `progress` sees each row as it lands.
    """
    from pallava.slides.mapping import check_templates

    check_templates(settings.templates)
    if engine not in ("local", "ray"):
        raise ValueError(f"--engine must be 'local' or 'ray', got {engine!r}")
    if engine == "ray":
        from pallava.scale import import_ray

        import_ray()  # before any work: a clear error when Ray is not installed
    slides = read_cohort(cohort) if isinstance(cohort, (str, Path)) else list(cohort)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(model_dir).is_dir():
        raise ValueError(f"PLIP model folder {model_dir} does not exist")
    model_id = model_fingerprint(model_dir)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for slide in slides:
        summary = finished_summary(
            slide_folder(out, slide), model_id, slide_options(slide, settings.options), settings.label_map
        )
        if summary is None:
            todo.append(slide)
        else:
            rows[slide.id] = summary_row(slide, summary, "done earlier")
            if progress is not None:
                progress(rows[slide.id])
    if todo and engine == "ray":
        results: Iterable[dict[str, Any]] = map_on_ray(
            todo, str(model_dir), str(out), settings, ray_address, workers, load_model
        )
    elif todo:
        mapper = SlideMapper(str(model_dir), settings, str(out), load_model)
        results = (mapper.map(slide) for slide in todo)
    else:
        results = ()
    for row in results:
        rows[row["id"]] = row
        if progress is not None:
            progress(row)
    ordered = [rows[slide.id] for slide in slides]
    write_cohort_summary(out, ordered, settings.label_map)
    return ordered


def write_cohort_summary(out: Path, rows: list[dict[str, Any]], label_map: LabelMap) -> None:
    """cohort.csv (one row per slide) and cohort.md (counts, per-slide table, failures with reasons)."""
    columns = [
        "id",
        "path",
        "status",
        "tissue_fraction",
        "tissue_area_mm2",
        "tiles",
        *(f"fraction:{label}" for label in label_map.labels()),
        "error",
    ]
    temporary = out / (SUMMARY_CSV + ".partial")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, out / SUMMARY_CSV)

    ok = [r for r in rows if r["status"] != "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    names = dict(zip(label_map.labels(), label_map.names(), strict=True))
    lines = [
        "# Cohort map",
        "",
        f"{len(rows)} slides: {len(ok)} mapped, {len(failed)} failed. "
        f"Per-slide outputs are in `slides/<id>/`.",
        "",
    ]
    if ok:
        lines += [
            "| slide | tissue mm² | tiles | " + " | ".join(names.values()) + " |",
            "|---|---:|---:|" + "---:|" * len(names),
        ]
        for r in ok:
            area = "" if r["tissue_area_mm2"] is None else f"{r['tissue_area_mm2']:.2f}"
            shares = " | ".join(f"{r[f'fraction:{label}']:.1%}" for label in names)
            lines.append(f"| `{r['id']}` | {area} | {r['tiles']} | {shares} |")
        lines.append("")
    if failed:
        lines += ["## Failures", ""]
        lines += [f"- `{r['id']}` ({r['path']}): {r['error']}" for r in failed]
    (out / REPORT).write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


# The Ray engine: a pool of actors, each holding the PLIP model once. One actor per GPU when the cluster
# has GPUs (each reserves one and runs PLIP there), else one per `CPUS_PER_WORKER` CPUs; never more actors
# than slides. A worker that dies mid-slide (node lost, process killed) is restarted and the slide retried
# up to `RETRIES` times, resuming from the embeddings the failed attempt flushed. A slide whose worker
# keeps dying is reported as failed and the cohort goes on.
CPUS_PER_WORKER = 1  # PLIP inference uses one core well; tile reading runs in the actor's threads
RETRIES = 3


def pool_size(
    resources: dict[str, float], slides: int, workers: int | None = None
) -> tuple[int, dict[str, float]]:
    """How many actors and what each reserves: GPUs when present, else CPUs."""
    if resources["GPU"] >= 1:
        count, per_actor = int(resources["GPU"]), {"num_cpus": CPUS_PER_WORKER, "num_gpus": 1}
    else:
        count, per_actor = (
            max(1, int(resources["CPU"] // CPUS_PER_WORKER)),
            {"num_cpus": CPUS_PER_WORKER, "num_gpus": 0},
        )
    return max(1, min(workers or count, slides)), per_actor


def map_on_ray(
    slides: Sequence[CohortSlide],
    model_dir: str,
    out_dir: str,
    settings: CohortSettings,
    address: str | None = None,
    workers: int | None = None,
    load_model: Callable[[str, str], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Map `slides` on the Ray cluster at `address`; yields one cohort row per slide as it finishes."""
    ray = connect(address)
    count, per_actor = pool_size(cluster_resources(ray), len(slides), workers)
    if per_actor["num_gpus"] and settings.device == "cpu":
        settings = replace(settings, device="cuda")
    actor_class = ray.remote(max_restarts=-1, max_task_retries=RETRIES, **per_actor)(SlideMapper)
    actors = [actor_class.remote(model_dir, settings, out_dir, load_model) for _ in range(count)]
    queue = list(reversed(slides))
    running: dict[Any, tuple[Any, CohortSlide]] = {}
    try:
        while queue or running:
            idle = [a for a in actors if all(a is not busy for busy, _ in running.values())]
            for actor in idle[: len(queue)]:
                slide = queue.pop()
                running[actor.map.remote(slide)] = (actor, slide)
            (done,), _ = ray.wait(list(running), num_returns=1)
            _, slide = running.pop(done)
            try:
                yield ray.get(done)
            except ray.exceptions.RayActorError as error:  # its worker died RETRIES + 1 times
                yield failure_row(slide, RuntimeError(f"worker died mapping this slide: {error}"))
            except ray.exceptions.RayTaskError as error:  # the model failed to load, or a bug
                yield failure_row(slide, error.as_instanceof_cause())
    finally:
        for actor in actors:
            ray.kill(actor)
