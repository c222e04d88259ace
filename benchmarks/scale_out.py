"""Local engine against Ray engine on the same inputs: corpus cleaning and a cohort of slides.

    python benchmarks/scale_out.py [--records 3120] [--slides 4] [--cpus 2] [--out FILE]

Cleaning: LC25000 lung tiles with generated captions, stain image judge, lexicon text judge, image duplicates
(the configuration docs/data.md measures). Cohort: copies of the shared slide, each mapped at the default
0.5 um/px with a random tiny PLIP. Each workload runs once per engine into a fresh folder; the Ray engine
gets a local Ray instance with `--cpus` CPUs, started before its clock runs (its start is reported apart).
Needs the shared data folder beside the repository and `pallava[ray]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/scale_out.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, load_average, machine_info, write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def clean_input(folder: Path, records: int) -> tuple[Path, object]:
    from pallava.data.builders import captions_from_labels
    from pallava.data.clean import CleanConfig
    from pallava.data.importers.manifest import read_manifest
    from pallava.data.io import write_jsonl
    from pallava.data.labels import LabelMap

    captions = captions_from_labels(
        read_manifest(DATA / "lc25000-lung" / "manifest.csv"), LabelMap.builtin("lc25000-lung")
    )
    # Past the 3,120 tiles the corpus cycles through them again under new ids (repeats are duplicates).
    rows = ({**captions[i % len(captions)].to_dict(), "id": f"r{i}"} for i in range(records))
    path = folder / "captions.jsonl"
    write_jsonl(rows, path)
    return path, CleanConfig(image_judge={"type": "stain"}, duplicate_mode="image")


def cohort_input(folder: Path, slides: int) -> tuple[Path, Path]:
    from pallava.models.plip import build_plip

    model, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    model.save_pretrained(folder / "plip")
    tokenizer.save_pretrained(folder / "plip")
    svs = DATA / "samples" / "wsi" / "cmu_small_region.svs"
    cohort = folder / "cohort.csv"
    cohort.write_text("path,id\n" + "".join(f"{svs},slide{i}\n" for i in range(slides)))
    return cohort, folder / "plip"


def measure(args: argparse.Namespace) -> dict:
    import ray

    from pallava.data.clean import clean, clean_on_ray
    from pallava.slides.cohort import CohortSettings, map_cohort
    from pallava.slides.mapping import load_classes

    results: dict = {"machine": machine_info(), "load_before": load_average(), "cpus": args.cpus}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus, config = clean_input(folder, args.records)
        cohort, plip = cohort_input(folder, max(args.slides, 1))
        settings = CohortSettings(label_map=load_classes("lc25000-lung"))
        jobs = {  # a count of 0 skips that workload
            "clean": (
                args.records,
                "records",
                lambda engine, tag: (clean if engine == "local" else clean_on_ray)(
                    corpus, folder / f"clean-{tag}", config, progress=False
                ),
            ),
            "cohort": (
                args.slides,
                "slides",
                lambda engine, tag: map_cohort(
                    cohort, plip, folder / f"cohort-{tag}", settings, engine=engine
                ),
            ),
        }
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        results["ray_start_s"] = round(time.perf_counter() - started, 2)
        try:
            # `ray` is the first Ray run of the workload (its worker processes start and import pallava and
            # torch); `ray_warm` runs it again into a fresh folder, when Ray reuses idle worker processes.
            for name, (count, unit, run) in jobs.items():
                if count == 0:
                    continue
                for engine, label in (("local", "local"), ("ray", "ray"), ("ray", "ray_warm")):
                    started = time.perf_counter()
                    run(engine, label)
                    seconds = time.perf_counter() - started
                    results[f"{name}_{label}_s"] = round(seconds, 2)
                    results[f"{name}_{label}_{unit}_per_s"] = round(count / seconds, 3)
                    print(f"{name} {label}: {count} {unit} in {seconds:.1f} s", flush=True)
                for label in ("ray", "ray_warm"):
                    results[f"{name}_{label}_over_local"] = round(
                        results[f"{name}_{label}_s"] / results[f"{name}_local_s"], 3
                    )
        finally:
            ray.shutdown()
    results["load_after"] = load_average()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--records", type=int, default=3120, help="caption records to clean (default 3120; 0: skip)"
    )
    parser.add_argument("--slides", type=int, default=4, help="slides in the cohort (default 4; 0: skip)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale-out.json"))
    args = parser.parse_args()
    results = measure(args)
    write_json(Path(args.out), results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
