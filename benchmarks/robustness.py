"""Augmentation ablation: PLIP trained with each augmentation on or off, tested on dev images shifted the way
another lab's slides differ (stain, magnification, scanner resolution).

    python benchmarks/robustness.py                       # every variant, 1 epoch each, the three shared
    datasets
    python benchmarks/robustness.py --variants none all   # a subset
    python benchmarks/robustness.py --report-only         # re-render docs from the stored results

Each variant trains the tiny PLIP on the train splits of all datasets (balanced as the quickstart does) and is
scored by zero-shot accuracy over each dataset's own classes on its dev split, as it is and under each shift.
The shifts are fixed transforms built from the shared data only, and none is an augmentation of training:

- `stain-a` / `stain-b`: the H&E optical densities re-mixed with another lab's stain vectors (bluer-black
  haematoxylin and orange eosin / paler haematoxylin and stronger eosin), fixed for every image;
- `zoom-in-2x`: the centre half of the tile enlarged (a 2x higher magnification);
- `zoom-out-2x`: four dev tiles of the same class and dataset side by side, shrunk (a 2x lower magnification);
- `low-res`: shrunk 3x, JPEG quality 40, enlarged back (an older scanner, heavier compression);
- `nct-stain`: each dataset's Macenko stain (H and E vectors and amounts, estimated over its dev split) mapped
  onto the stain of another lab's real tiles, `samples/crc` (NCT-CRC-HE-100K, colorectal, a darker and browner
  H&E than LC25000's): the one shift whose target comes from real slides rather than chosen numbers.
Results: `benchmarks/results/robustness.json`, rendered into `docs/robustness.md`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/robustness.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
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

RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
DOCS = ROOT / "docs" / "robustness.md"
DATASETS = SHIFT_DATASETS
OFF = {"flips": False, "stain": 0.0, "colour": 0.0, "zoom": 0.0, "max_zoom": 1.0, "resolution": 0.0}
ALL = {"flips": True, "stain": 0.1, "colour": 0.1, "zoom": 0.5, "max_zoom": 3.0, "resolution": 0.1}
VARIANTS = {  # name -> Augmentation fields
    "none": OFF,
    "flips": {**OFF, "flips": True},
    "flips+stain": {**OFF, "flips": True, "stain": 0.1, "colour": 0.1},
    "flips+zoom": {**OFF, "flips": True, "zoom": 0.5, "max_zoom": 3.0},
    "flips+resolution": {**OFF, "flips": True, "resolution": 0.3},
    "all": ALL,
    # the same, half the views in a stain between their dataset's and another's (processing/stain_mix.py)
    "all+stain-mix": {**ALL, "stain_mix": 0.5},
    # the same, each dye's amount multiplied by a log-uniform factor in [1/2, 2] (processing/augment.py)
    "all+stain-amount": {**ALL, "stain_amount": 2.0},
}
SHIFTS = ("original", "stain-a", "stain-b", "zoom-in-2x", "zoom-out-2x", "low-res", "nct-stain")
OTHER_LAB_TILES = ROOT.parent / "shared" / "data" / "samples" / "crc"  # the class is the name's prefix

# Another lab's stain vectors (rows: haematoxylin, eosin, residual) in optical density, and concentration
# scales.
_RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_LABS = {
    "stain-a": (np.array([[0.55, 0.75, 0.37], [0.02, 0.85, 0.52], [0.27, 0.57, 0.78]]), (1.3, 0.8, 1.0)),
    "stain-b": (np.array([[0.80, 0.58, 0.16], [0.20, 0.95, 0.24], [0.27, 0.57, 0.78]]), (0.6, 1.6, 1.0)),
}


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def restain(pixels: np.ndarray, lab: str) -> np.ndarray:
    """The image as another lab's stains would colour the same tissue (fixed transform)."""
    from pallava.processing.augment import map_densities

    vectors, scales = _LABS[lab]
    # Unmixed with the reference stains, each concentration scaled, mixed with the lab's: one density map.
    matrix = (np.linalg.inv(_unit_rows(_RUIFROK)) * np.array(scales)) @ _unit_rows(vectors)
    return map_densities(pixels, matrix.astype(np.float32)).astype(np.uint8)


@functools.cache
def other_lab_stain():
    """The Macenko stain of the other lab's tissue tiles pooled (background tiles left out)."""
    from pallava.processing.stain_mix import estimate_stain

    tiles = sorted(p for p in OTHER_LAB_TILES.glob("*.tif") if not p.name.startswith("BACK"))
    if not tiles:
        raise FileNotFoundError(f"{OTHER_LAB_TILES}: no .tif tiles for the nct-stain shift")
    return estimate_stain(np.asarray(Image.open(p).convert("RGB")) for p in tiles)


def restain_like_other_lab(pixels: list[np.ndarray]) -> list[np.ndarray]:
    """A set of tiles of one stain (a dataset's dev split) as the other lab's stain would colour them."""
    from pallava.processing.augment import map_densities
    from pallava.processing.stain_mix import estimate_stain, transfer_matrix

    matrix = transfer_matrix(estimate_stain(pixels), other_lab_stain()).astype(np.float32)
    return [map_densities(p, matrix).astype(np.uint8) for p in pixels]


def zoom_in(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    crop = pixels[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2]
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.BICUBIC))


def zoom_out(group: list[np.ndarray]) -> np.ndarray:
    """Four tiles of one class side by side, shrunk to one tile's size."""
    height, width = group[0].shape[:2]
    top, bottom = np.concatenate(group[:2], axis=1), np.concatenate(group[2:4], axis=1)
    return np.asarray(
        Image.fromarray(np.concatenate([top, bottom], axis=0)).resize((width, height), Image.BICUBIC)
    )


def low_resolution(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    small = Image.fromarray(pixels).resize((width // 3, height // 3), Image.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=40)
    return np.asarray(Image.open(buffer).convert("RGB").resize((width, height), Image.BICUBIC))


def shifted_sets(items: list, shift: str) -> tuple[list[Image.Image], list[str]]:
    """(images, labels) of a dev split under one shift."""
    from pallava.processing.loading import load_image

    pixels = [np.asarray(load_image(item.path).resize((224, 224))) for item in items]
    labels = [item.label for item in items]
    if shift == "zoom-out-2x":
        images, truth = [], []
        for label in sorted(set(labels)):
            members = [p for p, lab in zip(pixels, labels, strict=True) if lab == label]
            for start in range(
                0, len(members) - 3
            ):  # every run of four consecutive tiles: one image per tile
                images.append(zoom_out(members[start : start + 4]))
                truth.append(label)
        return [Image.fromarray(p) for p in images], truth
    if shift == "nct-stain":
        return [Image.fromarray(p) for p in restain_like_other_lab(pixels)], labels
    transform = {
        "original": lambda p: p,
        "stain-a": lambda p: restain(p, "stain-a"),
        "stain-b": lambda p: restain(p, "stain-b"),
        "zoom-in-2x": zoom_in,
        "low-res": low_resolution,
    }[shift]
    return [Image.fromarray(transform(p)) for p in pixels], labels


def train_variant(name: str, out: Path, epochs: float, seed: int) -> Path:
    from pallava.train.plip import PlipTrainConfig, train_plip

    model = out / name
    if (model / "config.json").is_file():
        return model
    shared = ROOT.parent / "shared" / "data"
    recipe = PlipTrainConfig.from_yaml(
        ROOT / "configs" / "plip-tiny.yaml", epochs=epochs, seed=seed, augment=VARIANTS[name]
    )
    train_plip(
        [str(shared / d / "manifest.csv") for d in DATASETS],
        model,
        recipe,
        split="train",
        show_progress=False,
    )
    return model


def shifted_views() -> dict:
    return {shift: functools.partial(shifted_sets, shift=shift) for shift in SHIFTS}


def evaluate(model: Path) -> dict[str, dict[str, float]]:
    return zeroshot_under_shifts(model, shifted_views())


def recorded_normalisation(out: Path) -> str | None:
    """The stain normalisation a quickstart's PLIP was trained with (recorded in its tower's config)."""
    from pallava.processing.stain_norm import check_stain_normalize

    config = json.loads((out / "plip" / "config.json").read_text())
    return check_stain_normalize(config["vision_config"].get("stain_normalize"))


def evaluate_demo(out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """A quickstart's PLIP (zero-shot) and assistant (class answers) under each shift, as they read images
    by default and with the other stain normalisation setting at inference (`--stain-normalize macenko`
    for models trained on plain images, `none` for models trained on normalised ones)."""
    rows = {}
    other = "none" if recorded_normalisation(out) else "macenko"
    for method in (None, other):
        suffix = f", {'without normalisation' if method == 'none' else method}" if method else ""
        rows[f"PLIP zero-shot{suffix}"] = zeroshot_under_shifts(out / "plip", shifted_views(), method)
        if method is None:  # the matching head as the suite reports it (images as the model reads them)
            rows["PLIP ITM zero-shot"] = zeroshot_under_shifts(out / "plip", shifted_views(), head="matching")
        rows[f"assistant{suffix}"] = assistant_under_shifts(
            out / "assistant", shifted_views(), stain_normalize=method
        )
    return rows


def demo_sections(results: dict) -> list[dict]:
    """The scored quickstart runs (results stored before there could be several hold one, `demo`)."""
    return results.get("demos") or ([results["demo"]] if results.get("demo") else [])


ANSWERS = {  # how the demo's assistant answered, by `assistant_under_shifts`' class_answers
    "generated": "its generated answer mapped to a class by the class names; anything else counts as wrong",
    "likelihood": "the class name it is likeliest to answer, as the suite takes it",
}


def render(results: dict) -> str:
    lines = [
        "# Robustness: which augmentation buys what",
        "",
        "PLIP (tiny preset) trained on the train splits of lung, colon and oral mucosa with one augmentation "
        "set per row, scored by zero-shot accuracy over each dataset's own classes on its dev split, as it "
        "is "
        "and under shifts built from the shared data (`benchmarks/robustness.py` says how each is made). "
        "Cells: mean accuracy over the three datasets (lung / colon / oral).",
        "",
        f"Command: `{results['command']}`; {results['epochs']} epoch(s) per variant, seed {results['seed']}; "
        f"{results['machine']}; load average {results['load_average']} at the start; "
        f"{results['seconds']:.0f} s in all.",
        "",
        *shifts_table("augmentation", SHIFTS, "original", "mean of the shifts", results["variants"]),
    ]
    lines += ["", "Augmentation settings per row:", ""]
    lines += [f"- `{name}`: `{json.dumps(VARIANTS[name])}`" for name in results["variants"]]
    if results.get("reading"):
        lines += ["", "## Reading (from the run above)", *results["reading"]]
    for number, demo in enumerate(demo_sections(results)):
        trained = demo.get("trained_normalisation")
        lines += ["", "## The trained models under the same shifts"] if number == 0 else []
        lines += [
            "",
            f"The PLIP and the assistant of a quickstart run ({demo['about']}): PLIP's zero-shot accuracy "
            "and the assistant's answer to the evaluation suite's class-choice question "
            f"({ANSWERS[demo.get('class_answers', 'generated')]}), "
            + (
                f"trained on {trained}-normalised images and so reading them normalised (the setting is "
                "recorded in the model), and with normalisation switched off (`--stain-normalize none`)."
                if trained
                else "each as it is and with Macenko stain normalisation at inference (`--stain-normalize "
                "macenko`: every image mapped onto reference H&E stain vectors before it is read)."
            ),
            "",
            f"Command: `{demo['command']}`; load average {demo['load_average']} at the start; "
            f"{demo['seconds']:.0f} s.",
            "",
            *shifts_table("model", SHIFTS, "original", "mean of the shifts", demo["rows"]),
        ]
        if demo.get("reading"):
            lines += ["", *demo["reading"]]
    return "\n".join(lines) + "\n"


def _score_demo(out: Path, about: str, command: str) -> int:
    if not (out / "plip").is_dir() or not (out / "assistant").is_dir():
        raise SystemExit(f"--demo {out}: expected a quickstart output folder with plip/ and assistant/")
    results = json.loads(RESULTS.read_text())  # the variants' table stays
    started, load = time.time(), load_average()
    rows = evaluate_demo(out)
    section = {
        "about": about,
        "command": command,
        "load_average": load,
        "seconds": time.time() - started,
        "rows": rows,
        "class_answers": "likelihood",
        "trained_normalisation": recorded_normalisation(out),
    }
    sections = [demo for demo in demo_sections(results) if demo["about"] != about] + [section]
    results.pop("demo", None)
    results["demos"] = sections  # one section per quickstart run scored, a run scored again replaced
    write_json(RESULTS, results)
    write_docs(results)
    print(f"wrote {RESULTS} and {DOCS}")
    return 0


# The page is rendered from the results down to this line; what follows it is written by hand and kept.
HAND_WRITTEN = "<!-- Sections below are written by hand: re-rendering keeps them. -->"


def write_docs(results: dict, docs: Path = DOCS) -> None:
    """Render the results into `docs`, keeping its hand-written sections (after `HAND_WRITTEN`)."""
    old = docs.read_text() if docs.is_file() else ""
    kept = old.split(HAND_WRITTEN, 1)[1] if HAND_WRITTEN in old else ""
    docs.write_text(render(results) + (f"\n{HAND_WRITTEN}{kept}" if kept else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "robustness")
    parser.add_argument("--report-only", action="store_true", help="re-render docs from the stored results")
    parser.add_argument(
        "--demo",
        type=Path,
        metavar="OUT",
        help="instead of training variants: score a quickstart's OUT/plip and OUT/assistant under the shifts",
    )
    parser.add_argument("--demo-about", default="", help="where the quickstart run came from")
    args = parser.parse_args(argv)
    if args.report_only:
        write_docs(json.loads(RESULTS.read_text()))
        return 0
    command = command_line("robustness.py", sys.argv[1:] if argv is None else argv)
    if args.demo is not None:
        return _score_demo(args.demo, args.demo_about or str(args.demo), command)
    started, load = time.time(), load_average()
    results = {
        "command": command,
        "epochs": args.epochs,
        "seed": args.seed,
        "machine": machine_info().get("cpu", "this machine"),
        "load_average": load,
        "variants": {},
    }
    for name in args.variants:
        model = train_variant(name, args.out, args.epochs, args.seed)
        results["variants"][name] = evaluate(model)
        print(name, json.dumps(results["variants"][name]), flush=True)
    results["seconds"] = time.time() - started
    if RESULTS.is_file() and (stored := demo_sections(json.loads(RESULTS.read_text()))):
        results["demos"] = stored  # the trained models' sections are measured apart (--demo)
    write_json(RESULTS, results)
    write_docs(results)
    print(f"wrote {RESULTS} and {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
