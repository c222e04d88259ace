"""Magnification sensitivity: a trained PLIP's zero-shot accuracy on dev images seen at other magnifications.

    python benchmarks/magnification.py --model "label=runs/quickstart/plip" [--model "other=DIR" ...]
    python benchmarks/magnification.py --report-only      # re-render docs from the stored results

Another lab scans at another power, and a dataset resized to 224 px keeps whatever field of view its
originals had, so the same tissue reaches the model larger or smaller than in training. Each zoom z is a
fixed view built from the shared dev splits only:

- z > 1 (a higher power): the centre 1/z of each image enlarged back to its size;
- z < 1 (a lower power): 1/z x 1/z dev images of the same class side by side (the image itself first, the
  others drawn with a fixed seed) shrunk to one image's size.

Cells: zero-shot accuracy over each dataset's own classes (lung / colon / oral) and their mean; the last
column is the mean over the zooms other than 1. Results: `benchmarks/results/magnification.json`, rendered
into `docs/magnification.md`.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/magnification.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ROOT,
    SHIFT_DATASETS,
    assistant_under_shifts,
    command_line,
    load_average,
    machine_info,
    shifts_table,
    write_json,
    zeroshot_under_shifts,
)

RESULTS = ROOT / "benchmarks" / "results" / "magnification.json"
DOCS = ROOT / "docs" / "magnification.md"
DATASETS = SHIFT_DATASETS
ZOOMS = (1 / 3, 1 / 2, 1.0, 2.0, 3.0, 4.0)
SIZE = 224


def zoom_label(zoom: float) -> str:
    return f"x{zoom:.2g}"


def magnified_views(items: list, zoom: float, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """(views, labels) of a dev split at `zoom` x its magnification; one view per image, same order."""
    from pallava.processing.loading import load_image

    images = [load_image(item.path).resize((SIZE, SIZE)) for item in items]
    labels = [item.label for item in items]
    if zoom >= 1:
        side = round(SIZE / zoom)
        start = (SIZE - side) // 2
        box = (start, start, start + side, start + side)
        return [image.crop(box).resize((SIZE, SIZE), Image.BICUBIC) for image in images], labels
    n = round(1 / zoom)
    rng = random.Random(seed)
    views = []
    for index, label in enumerate(labels):
        others = [j for j, other in enumerate(labels) if other == label and j != index]
        if len(others) < n * n - 1:
            raise ValueError(f"zoom {zoom}: class {label!r} has too few dev images for a {n}x{n} mosaic")
        canvas = Image.new("RGB", (SIZE * n, SIZE * n))
        for k, j in enumerate([index, *rng.sample(others, n * n - 1)]):
            canvas.paste(images[j], ((k % n) * SIZE, (k // n) * SIZE))
        views.append(canvas.resize((SIZE, SIZE), Image.BICUBIC))
    return views, labels


def views_by_zoom() -> dict:
    return {zoom_label(zoom): functools.partial(magnified_views, zoom=zoom) for zoom in ZOOMS}


def evaluate(model: Path) -> dict[str, dict[str, float]]:
    return zeroshot_under_shifts(model, views_by_zoom())


def evaluate_assistant(model: Path) -> dict[str, dict[str, float]]:
    return assistant_under_shifts(model, views_by_zoom(), class_answers="generated")  # as its page says


def _table(entries: dict) -> list[str]:
    columns = [zoom_label(z) for z in ZOOMS]
    scores = {name: entry["scores"] for name, entry in entries.items()}
    return shifts_table("model", columns, "x1", "mean off x1", scores)


def render(results: dict) -> str:
    lines = [
        "# Magnification: how far from its training scale PLIP and the assistant still read the tissue",
        "",
        "Zero-shot accuracy of a trained PLIP on the dev splits seen at other magnifications, built from the "
        "shared data only (`benchmarks/magnification.py` says how). Cells: mean over the three datasets "
        "(lung / colon / oral); the last column is the mean over every zoom but x1.",
        "",
        f"Command: `{results['command']}`; {results['machine']}; load average {results['load_average']} at "
        f"the start; {results['seconds']:.0f} s.",
        "",
        *_table(results["models"]),
        "",
        "Models:",
        "",
    ]
    lines += [f"- `{name}`: {entry['about']}" for name, entry in results["models"].items()]
    assistants = results.get("assistants") or {}
    if assistants:
        lines += [
            "",
            "## The assistant",
            "",
            "The same views, answered by a trained assistant: the evaluation suite's class-choice question "
            "(`Which of the following best describes this image: ...?`, the dataset's own classes), the "
            "answer mapped to a class by its names and synonyms; an answer that names no class counts as "
            "wrong. The lower powers (x0.33, x0.5) are mosaics of 9 or 4 dev images of one class, so such a "
            "view holds more tissue of its class than one image: a wider field, as a lower power gives, "
            "and more evidence for the class than the x1 view.",
            "",
            *_table(assistants),
            "",
        ]
        lines += [
            f"- `{name}`: {entry['about']} (`{entry['command']}`; load average {entry['load_average']} at "
            f"the start; {entry['seconds']:.0f} s)"
            for name, entry in assistants.items()
        ]
    return "\n".join(lines) + "\n"


def _named_folders(parser, pairs: list[str], option: str) -> list[tuple[str, Path]]:
    named = []
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"{option} {pair!r}: expected NAME=DIR with an existing model folder")
        named.append((name, Path(folder)))
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a trained PLIP folder and the name of its row (repeat); replaces the stored PLIP rows",
    )
    parser.add_argument("--about", action="append", default=[], help="how each model was trained (in order)")
    parser.add_argument(
        "--assistant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a trained assistant folder and the name of its row (repeat); stored rows of other names stay",
    )
    parser.add_argument("--assistant-about", action="append", default=[], help="each assistant's origin")
    parser.add_argument("--report-only", action="store_true", help="re-render docs from the stored results")
    args = parser.parse_args(argv)
    if args.report_only:
        DOCS.write_text(render(json.loads(RESULTS.read_text())))
        return 0
    if not args.model and not args.assistant:
        parser.error("give at least one --model NAME=DIR or --assistant NAME=DIR")
    models = _named_folders(parser, args.model, "--model")
    assistants = _named_folders(parser, args.assistant, "--assistant")
    command = command_line("magnification.py", sys.argv[1:] if argv is None else argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if models:  # the PLIP rows are measured together and replace the stored ones
        started, load = time.time(), load_average()
        results.update(
            command=command, machine=machine_info().get("cpu", "this machine"), load_average=load, models={}
        )
        for position, (name, folder) in enumerate(models):
            about = args.about[position] if position < len(args.about) else str(folder)
            results["models"][name] = {"about": about, "scores": evaluate(folder)}
            print(name, json.dumps(results["models"][name]["scores"]), flush=True)
        results["seconds"] = time.time() - started
    if "models" not in results:
        parser.error(f"{RESULTS} holds no PLIP rows yet: measure at least one --model first")
    for position, (name, folder) in enumerate(assistants):
        about = args.assistant_about[position] if position < len(args.assistant_about) else str(folder)
        begun, begun_load = time.time(), load_average()
        scores = evaluate_assistant(folder)
        results.setdefault("assistants", {})[name] = {
            "about": about,
            "scores": scores,
            "command": command_line("magnification.py", ["--assistant", f"{name}={folder}"]),
            "load_average": begun_load,
            "seconds": time.time() - begun,
        }
        print(name, json.dumps(scores), flush=True)
    write_json(RESULTS, results)
    DOCS.write_text(render(results))
    print(f"wrote {RESULTS} and {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
